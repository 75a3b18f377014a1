#!/usr/bin/env bash
# Reproduce docs/RESULTS.md: base MLPs, then parity models for every (k, encoder) with one recipe.
#   scripts/reproduce_results.sh default   # the project's recipe
#   scripts/reproduce_results.sh paper     # the authors' recipe (500 epochs; ~10 min per model)
# Each model is trained by the public CLI; wall and CPU seconds go to runs/results/<recipe>/*.time.
# Datasets come from --data-root / $PARM_DATA_ROOT (add --download to fetch them).
#   CONFIGS="8:tiles 8:add" SEEDS="0 1 2" scripts/reproduce_results.sh default   # any k:encoder list, seeds
# (seed 0 writes <ds>-k<k>-<enc>.*, seed s > 0 <ds>-k<k>-<enc>-s<s>.*; the base model is the same for all)
#   TAG=-b2 BASE_ARGS="--seed 1 --epochs 30" scripts/reproduce_results.sh default   # a second base model:
# runs/<ds>-mlp-b2/base trained with BASE_ARGS, results in runs/results/default-b2
set -euo pipefail
recipe="${1:-default}"
datasets="${DATASETS:-mnist fashion-mnist}"
configs="${CONFIGS:-2:add 3:add 4:add 2:concat 4:concat}"
seeds="${SEEDS:-0}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
parm="${PARM:-parm}"
tag="${TAG:-}"
base_args="${BASE_ARGS:-}"
out="runs/results/$recipe$tag"
mkdir -p "$out"
TIMEFORMAT='%R %U %S'

timed() {  # timed NAME CMD...: run CMD, append "wall_s user_s sys_s" to $out/NAME.time
  local name="$1"; shift
  { time "$@" >"$out/$name.log" 2>&1; } 2>"$out/$name.time" || { cat "$out/$name.log"; return 1; }
}

for ds in $datasets; do
  base="runs/$ds-mlp$tag/base"
  # resumable: a finished base run is only re-evaluated (run one recipe first when running both at once)
  # shellcheck disable=SC2086  # BASE_ARGS is a list of options
  timed "$ds-base" $parm train-base --dataset "$ds" --model mlp --out "$base" --no-progress $base_args
  for cfg in $configs; do
    k="${cfg%%:*}"; enc="${cfg##*:}"
    for seed in $seeds; do
      suffix=""; [ "$seed" = 0 ] || suffix="-s$seed"
      name="$ds-k$k-$enc$suffix"
      dir="runs/$ds-mlp$tag/$recipe/k$k-$enc$suffix"
      timed "$name" $parm train-parity --base "$base" --k "$k" --encoder "$enc" --recipe "$recipe" --seed "$seed" \
        --out "$dir" --no-progress
      $parm eval --base "$base" --parity "$dir" --json "$out/$name.json" > /dev/null
    done
  done
done
echo "results in $out"
