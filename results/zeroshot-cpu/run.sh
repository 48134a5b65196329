#!/usr/bin/env bash
# Zero-shot perplexity of the lm suite's MDM and LoopMDM (seed-0 runs) on the offline sets,
# two seeds of the (t, mask) draws. ~15 min on CPU-2 with OMP_NUM_THREADS=1.
# Usage: bash results/zeroshot-cpu/run.sh RUNS_DIR   (RUNS_DIR holds mdm-s0 and loop-s0)
set -euo pipefail
RUNS=${1:-results/lm-cpu/runs}
export OMP_NUM_THREADS=1
for arm in mdm loop; do
  for seed in 1234 1235; do
    loopmdm zeroshot "$RUNS/$arm-s0" --loops 1,4,8,12 --sets lambada,brown,gutenberg \
      --batches 6 --batch-size 64 --seed "$seed" --out "results/zeroshot-cpu/$arm-seed$seed"
  done
done
