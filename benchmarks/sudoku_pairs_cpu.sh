#!/usr/bin/env bash
# Sudoku as puzzle -> solution pairs at CPU scale (issue "Reasoning", docs/RESULTS.md): MDM and
# LoopMDM (DiT 4 x 128, loop layer [1, 2), S ~ U{1..8}; configs/experiments/sudoku.yaml) trained
# from scratch on prompt/answer rows `puzzle EOS solution EOS` (answer-only loss, prompt never
# masked) with the same FLOPs, then scored on held-out puzzles under the restricted (raster:
# row-major) and free (confidence: easy first) decoding orders at several loop counts, by
# difficulty (rounds of naked/hidden singles). Resumable: rerun the same command.
# docs/RESULTS.md's LoopMDM row: ARMS=loop TEST_NUM=250 (each S costs (3 + S)/4 of an MDM call).
#   OUT=runs/sudoku-pairs bash benchmarks/sudoku_pairs_cpu.sh
set -euo pipefail
OUT=${OUT:-runs/sudoku-pairs}
LOOPMDM=${LOOPMDM:-loopmdm}
FLOPS=${FLOPS:-2.4e13}
NUM=${NUM:-50000}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
[ -f "$OUT/sudoku6.jsonl" ] || $LOOPMDM pairs sudoku:6 --num "$NUM" --seed 0 --out "$OUT/sudoku6.jsonl"
for arm in ${ARMS:-mdm loop}; do
  run="$OUT/$arm"
  arm_cfg=""; [ "$arm" = mdm ] && arm_cfg="model.loop_start=null model.loop_end=null"
  if [ ! -f "$run/train.done" ]; then
    resume=""; [ -d "$run/checkpoints" ] && resume="--resume"
    $LOOPMDM train experiments/sudoku $resume $arm_cfg data.source=pairs \
        "data.paths=['$OUT/sudoku6.jsonl']" data.tokenizer=bpe data.seq_len=80 train.max_flops=$FLOPS \
        train.eval_every=250 train.checkpoint_every=250 train.out_dir="$run" > "$run.train.log" 2>&1
    touch "$run/train.done"
  fi
  loops=${LOOPS:-1,4,8}; [ "$arm" = loop ] || loops=1
  for order in raster confidence; do
    [ -f "$run/solve-$order.json" ] || { $LOOPMDM solve "$run" --order $order --answer-len 36 --num ${TEST_NUM:-500} \
        --loops $loops --json > "$run/solve-$order.json.tmp" && mv "$run/solve-$order.json.tmp" "$run/solve-$order.json"; }
  done
done
echo "done: $OUT"
