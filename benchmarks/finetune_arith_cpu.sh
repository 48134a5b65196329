#!/usr/bin/env bash
# Reasoning at CPU scale (issue "Reasoning", docs/RESULTS.md): fine-tune the `lm` suite's
# pretrained MDM, LoopMDM and deeper MDM (seed 0, DiT 4 x 128, 7.2e12 pretraining FLOPs each) on
# reasoning-gym chain_sum (1-digit operands, 2-4 terms) with the same recipe and FLOPs, then
# exact match per loop count and per number of terms. Resumable: finished steps are skipped.
#   LM_RUNS=results/lm-cpu/runs OUT=runs/ft-arith bash benchmarks/finetune_arith_cpu.sh
set -euo pipefail
LM_RUNS=${LM_RUNS:-results/lm-cpu/runs}
OUT=${OUT:-runs/ft-arith}
LOOPMDM=${LOOPMDM:-loopmdm}
FLOPS=${FLOPS:-6e12}
LR=${LR:-3e-4}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
PAIRS="$OUT/chain_sum.jsonl"
[ -f "$PAIRS" ] || $LOOPMDM pairs rg:chain_sum:min_terms=2,max_terms=4,min_digits=1,max_digits=1 \
    --num 20000 --seed 0 --out "$PAIRS"
for arm in ${ARMS:-mdm loop deeper}; do
  run="$OUT/$arm"
  if [ ! -f "$run/finetune.done" ]; then
    resume=""; [ -d "$run/checkpoints" ] && resume="--resume"
    $LOOPMDM finetune "$PAIRS" --init "$LM_RUNS/$arm-s0" $resume data.seq_len=40 data.val_fraction=0.05 \
        train.batch_size=64 train.max_steps=0 train.max_flops=$FLOPS train.lr=$LR train.ema=0.99 \
        train.eval_every=100 train.checkpoint_every=100 train.out_dir="$run" > "$run.train.log" 2>&1
    touch "$run/finetune.done"
  fi
  loops=1,2,4,8,16; [ "$arm" = loop ] || loops=1
  for order in confidence raster; do
    [ -f "$run/solve-$order.json" ] || $LOOPMDM solve "$run" --order $order --loops $loops --num 400 --json \
        > "$run/solve-$order.json.tmp" && mv "$run/solve-$order.json.tmp" "$run/solve-$order.json"
  done
done
echo "done: $OUT"
