#!/usr/bin/env bash
# Everything a session lent a GPU should measure, in ONE device call (< 10 min on one H100,
# no network). Prepare here first:   bash benchmarks/gpu_wheels.sh
# On the device (run tool):          bash benchmarks/gpu_run.sh     carry [".whl"], timeout_s 600
# Dry run here (CPU, small sizes):   PY=.venv/bin/python DRY_RUN=1 bash benchmarks/gpu_run.sh
# 1. benchmarks/cuda_check.py: numerics, training, sampler exactness, step time / MFU;
# 2. the matched-FLOPs suites at --scale gpu (khop, sudoku: sweep + 2 seeds, 5 arms), with
#    training runs in parallel on the one GPU; each stage has its own time limit, and every
#    suite is resumable, so a second call continues where the first stopped.
# Results: $OUT/cuda_check.json, $OUT/results.tar.gz (summary.md/json + PNGs of each suite), $OUT/log.
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
if [ -n "${DRY_RUN:-}" ]; then
    # the same stages at token budgets; one suite and two arms keep it to minutes on 2 cores
    CHECK=(--device cpu --quick); SCALE=(--scale gpu --dry-run --arms mdm,loop); SUITES=(sudoku)
    JOBS=2; LIMIT_CHECK=900; LIMIT_SUITES=1800
else
    CHECK=(--device cuda); SCALE=(--scale gpu); SUITES=(khop sudoku); JOBS=6; LIMIT_CHECK=150; LIMIT_SUITES=400
fi
{
    nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
    timeout "$LIMIT_CHECK" "$PY" benchmarks/cuda_check.py "${CHECK[@]}" --out "$OUT"
    echo "cuda_check exit $?"
    timeout "$LIMIT_SUITES" "$PY" -m loopmdm.cli experiment "${SUITES[@]}" "${SCALE[@]}" --jobs "$JOBS"
    echo "suites exit $?"
} 2>&1 | tee "$OUT/log"
tar czf "$OUT/results.tar.gz" $(ls -d results/*-gpu*/summary.* results/*-gpu*/*.png 2>/dev/null) 2>/dev/null
ls -la "$OUT"
