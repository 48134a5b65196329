"""`loopmdm export` on a real run: export wall time, transformers load time, and the exported
model's logits and forward time against the project's at several loop counts.

    .venv/bin/python benchmarks/export_hf.py RUN OUT_DIR [--loops 1,4,12] [--batch 8]

Writes OUT_DIR (replacing an earlier export there). Sets HF_MODULES_CACHE under OUT_DIR's
parent unless it is set, so transformers' copy of the remote code stays out of ~/.cache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def mean_time(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("out_dir")
    parser.add_argument("--loops", default="1,4,12")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("HF_MODULES_CACHE", str(Path(args.out_dir).resolve().parent / "hf_modules"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    start = time.perf_counter()  # the CLI as a user runs it, in its own process
    done = subprocess.run([sys.executable, "-m", "loopmdm.cli", "export", args.run, args.out_dir, "--overwrite",
                           "--json"], capture_output=True, text=True)
    export_s = time.perf_counter() - start
    if done.returncode:
        sys.exit(done.stderr)
    summary = json.loads(done.stdout)

    import torch

    from loopmdm.runs import load_run

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    run = load_run(args.run, device="cpu")
    start = time.perf_counter()
    from transformers import AutoModelForMaskedLM

    import_s = time.perf_counter() - start
    loads = []
    for _ in range(2):  # the first pays transformers' lazy imports and the remote-code copy
        start = time.perf_counter()
        model = AutoModelForMaskedLM.from_pretrained(args.out_dir, trust_remote_code=True, local_files_only=True).eval()
        loads.append(time.perf_counter() - start)
    torch.manual_seed(0)
    x = torch.randint(0, run.model.mask_id + 1, (args.batch, run.cfg.data.seq_len))
    rows = []
    with torch.no_grad():
        for S in [int(s) for s in args.loops.split(",")]:
            diff = (run.model(x, num_loops=S) - model(input_ids=x, num_loops=S).logits).abs().max().item()
            rows.append({"S": S, "max_abs_diff": diff,
                         "project_s": round(mean_time(lambda: run.model(x, num_loops=S)), 3),
                         "hf_s": round(mean_time(lambda: model(input_ids=x, num_loops=S)), 3)})
    print(json.dumps({"params": summary["params"], "batch": list(x.shape), "export_cli_s": round(export_s, 2),
                      "weights_bytes": os.path.getsize(Path(args.out_dir) / "model.safetensors"),
                      "transformers_import_s": round(import_s, 2), "from_pretrained_s": [round(t, 2) for t in loads],
                      "per_loop_count": rows}, indent=1))


if __name__ == "__main__":
    main()
