#!/usr/bin/env bash
# Reproduce the CIFAR-10 rows of docs/RESULTS.md: a LeNet-5 base (crop-flip, 40 epochs), then parity models
# for k = 2, 4 with the add, concat and tiles codes (default recipe, 100 epochs), each evaluated on the test split.
#   scripts/cifar_results.sh PATH/cifar10-jpeg      # an image folder with train/<class>/ and test/<class>/
# Wall and CPU seconds of each train-parity go to runs/results/cifar/*.time; results to runs/results/cifar/*.json.
set -euo pipefail
folder="${1:?usage: scripts/cifar_results.sh PATH/cifar10-jpeg}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
parm="${PARM:-parm}"
out=runs/results/cifar
base=runs/cifar/lenet-crop-flip-e40
mkdir -p "$out"
TIMEFORMAT='%R %U %S'
$parm train-base --dataset "imagefolder:$folder" --model lenet5 --augment crop-flip --out "$base" --no-progress
for cfg in 2:add 2:concat 2:tiles 4:add 4:concat 4:tiles; do
  k="${cfg%%:*}"; enc="${cfg##*:}"; name="cifar-k$k-$enc"
  { time $parm train-parity --base "$base" --k "$k" --encoder "$enc" --epochs 100 --dataset "imagefolder:$folder" \
      --out "runs/cifar/k$k-$enc" --no-progress > "$out/$name.log" 2>&1; } 2> "$out/$name.time"
  $parm eval --base "$base" --parity "runs/cifar/k$k-$enc" --dataset "imagefolder:$folder" --json "$out/$name.json" > /dev/null
done
echo "results in $out"
