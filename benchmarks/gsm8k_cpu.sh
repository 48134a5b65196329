#!/usr/bin/env bash
# GSM8K at CPU scale (issue "Reasoning", docs/RESULTS.md): fine-tune the `lm` suite's pretrained
# MDM and LoopMDM (seed 0, DiT 4 x 128, ~1M parameters, 7.2e12 pretraining FLOPs on 2.7M tokens of
# Shakespeare + BBC news) on reasoning-gym's GSM8K-style templates (gsm_symbolic), then score the
# real GSM8K test set (1,319 problems, exact match of the final number). A model this size is
# expected near zero: this checks the pipeline end to end. Resumable.
#   LM_RUNS=results/lm-cpu/runs OUT=runs/ft-gsm8k bash benchmarks/gsm8k_cpu.sh
set -euo pipefail
LM_RUNS=${LM_RUNS:-results/lm-cpu/runs}
OUT=${OUT:-runs/ft-gsm8k}
LOOPMDM=${LOOPMDM:-loopmdm}
FLOPS=${FLOPS:-6e12}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
[ -f "$OUT/gsm_symbolic.jsonl" ] || $LOOPMDM pairs rg:gsm_symbolic --num 20000 --seed 0 --out "$OUT/gsm_symbolic.jsonl"
[ -f "$OUT/gsm8k_test.jsonl" ] || $LOOPMDM pairs gsm8k-test --num 1319 --out "$OUT/gsm8k_test.jsonl"
for arm in ${ARMS:-mdm loop}; do
  run="$OUT/$arm"
  if [ ! -f "$run/finetune.done" ]; then
    resume=""; [ -d "$run/checkpoints" ] && resume="--resume"
    $LOOPMDM finetune "$OUT/gsm_symbolic.jsonl" --init "$LM_RUNS/$arm-s0" $resume data.seq_len=256 \
        train.batch_size=16 train.max_steps=0 train.max_flops=$FLOPS train.lr=3e-4 train.ema=0.99 \
        train.eval_every=100 train.checkpoint_every=100 train.out_dir="$run" > "$run.train.log" 2>&1
    touch "$run/finetune.done"
  fi
  loops=1,4,8; [ "$arm" = loop ] || loops=1
  [ -f "$run/gsm8k.json" ] || $LOOPMDM solve "$run" --pairs "$OUT/gsm8k_test.jsonl" --order confidence --answer-len 8 --num 1319 \
      --loops $loops --json > "$run/gsm8k.json.tmp" && mv "$run/gsm8k.json.tmp" "$run/gsm8k.json"
done
echo "done: $OUT"
