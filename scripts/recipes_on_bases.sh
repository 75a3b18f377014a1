#!/usr/bin/env bash
# Both parity recipes (default, paper) on two MNIST base models, k = 2 addition, three seeds each:
# the project's base (runs/mnist-mlp/base: normalised inputs, 15 epochs; `scripts/reproduce_results.sh`
# trains it) and the ParM authors' base (x/255 inputs), imported from their safetensors file.
#   scripts/recipes_on_bases.sh PATH/authors-mnist-base-mlp/model.safetensors
# Results: runs/results/recipes/<base>-<recipe>-s<seed>.{json,time,log}; `python scripts/results_table.py`
# prints the table. The paper recipe runs 500 epochs (about 4–5 CPU minutes per model on a 2-core machine). The project base's
# default-recipe models are those of `scripts/reproduce_results.sh` (SEEDS="0 1 2" CONFIGS="2:add"),
# found in runs/mnist-mlp/default and only evaluated here (their .time is then the check, not the training).
#   RECIPES="paper" SEEDS="0" BASES="authors" ...   # a subset
set -euo pipefail
weights="${1:?usage: scripts/recipes_on_bases.sh AUTHORS_WEIGHTS.safetensors}"
parm="${PARM:-parm}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
out="runs/results/recipes"
mkdir -p "$out"
TIMEFORMAT='%R %U %S'
if [ ! -f runs/authors/base/record.json ]; then
  $parm import --arch mlp --weights "$weights" --rename nn.0.=net.1. --rename nn.2.=net.3. --rename nn.4.=net.5. \
    --in-shape 1,28,28 --classes 10 --mean 0 --std 1 --dataset mnist --out runs/authors/base > "$out/authors-import.log"
fi
declare -A base_dir=([project]=runs/mnist-mlp/base [authors]=runs/authors/base)
for base in ${BASES:-project authors}; do
  for recipe in ${RECIPES:-default paper}; do
    for seed in ${SEEDS:-0 1 2}; do
      name="$base-$recipe-s$seed"
      dir="runs/recipes/$base/$recipe-k2-add-s$seed"
      if [ "$base-$recipe" = project-default ]; then  # trained by scripts/reproduce_results.sh: found, not re-run
        dir="runs/mnist-mlp/default/k2-add"; [ "$seed" = 0 ] || dir="$dir-s$seed"
      fi
      { time $parm train-parity --base "${base_dir[$base]}" --k 2 --encoder add --recipe "$recipe" --seed "$seed" \
          --out "$dir" --no-progress >"$out/$name.log" 2>&1; } 2>"$out/$name.time" || { cat "$out/$name.log"; exit 1; }
      $parm eval --base "${base_dir[$base]}" --parity "$dir" --json "$out/$name.json" > /dev/null
      $parm eval --base "${base_dir[$base]}" --parity "$dir" --pairing consecutive --json "$out/$name-consecutive.json" > /dev/null
    done
  done
done
echo "results in $out"
