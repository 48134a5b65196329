#!/usr/bin/env bash
# What a session lent a GPU should measure, in device calls of < 8 min each (no network).
# Prepare here first:                bash benchmarks/gpu_wheels.sh
# On the device (run tool):          bash benchmarks/gpu_run.sh     carry [".whl"], timeout_s 600
# Dry run here (CPU, small sizes):   PY=.venv/bin/python DRY_RUN=1 bash benchmarks/gpu_run.sh
# STAGES picks what runs (default "check throughput", ~7.5 min; then STAGES=suites in a second call):
#   check       benchmarks/cuda_check.py: numerics, training, sampler exactness, step time / MFU,
#               per-block compile without recompiles across S, flash / memory-efficient SDPA;
#   throughput  benchmarks/throughput.py: paper-owt (12x768, seq 1024) at S = 1, 6, 12 and S drawn,
#               eager and compiled, per-iteration checkpointing off and on: tokens/s, MFU, peak memory;
#   suites      the matched-FLOPs suites at --scale gpu (khop, sudoku: sweep + 2 seeds, 5 arms), with
#               training runs in parallel on the one GPU; resumable, so a later call continues.
# Each stage has its own time limit. Results: $OUT/cuda_check.json, $OUT/throughput.{json,md},
# $OUT/results.tar.gz (suites: summary.md/json + PNGs), $OUT/log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu-run}
mkdir -p "$OUT"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
PY=${PY:-python3}
STAGES=${STAGES:-check throughput}
if [ -n "${DRY_RUN:-}" ]; then
    # the same stages at token budgets; one suite and two arms keep it to minutes on 2 cores;
    # the throughput plumbing with dynamo's aot_eager backend (inductor's C++ build takes minutes here)
    CHECK=(--device cpu --quick); SCALE=(--scale gpu --dry-run --arms mdm,loop); SUITES=(sudoku)
    THROUGHPUT=(--preset tiny --device cpu --batch 2 --seq-len 32 --warmup 1 --repeats 1 --compile-backend aot_eager)
    JOBS=2; LIMIT_CHECK=900; LIMIT_THROUGHPUT=900; LIMIT_SUITES=1800
else
    CHECK=(--device cuda); SCALE=(--scale gpu); SUITES=(khop sudoku); JOBS=6
    THROUGHPUT=(--preset paper-owt --device cuda --batch 16 --warmup 2 --repeats 5)
    LIMIT_CHECK=200; LIMIT_THROUGHPUT=260; LIMIT_SUITES=400
fi
has() { [[ " $STAGES " == *" $1 "* ]]; }
{
    nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
    echo "stages: $STAGES"
    if has check; then
        timeout "$LIMIT_CHECK" "$PY" benchmarks/cuda_check.py "${CHECK[@]}" --out "$OUT"
        echo "cuda_check exit $?"
    fi
    if has throughput; then  # writes $OUT/throughput.{json,md} after each configuration
        timeout "$LIMIT_THROUGHPUT" "$PY" benchmarks/throughput.py "${THROUGHPUT[@]}" --loops 1,6,12,drawn \
            --modes eager,compiled --checkpointing off,on --out "$OUT"
        echo "throughput exit $?"
    fi
    if has suites; then
        timeout "$LIMIT_SUITES" "$PY" -m loopmdm.cli experiment "${SUITES[@]}" "${SCALE[@]}" --jobs "$JOBS"
        echo "suites exit $?"
    fi
} 2>&1 | tee "$OUT/log"
has suites && tar czf "$OUT/results.tar.gz" $(ls -d results/*-gpu*/summary.* results/*-gpu*/*.png 2>/dev/null) 2>/dev/null
ls -la "$OUT"
