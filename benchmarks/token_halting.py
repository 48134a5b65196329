"""Does per-token halting save wall time, not only FLOPs on paper?

One loop iteration of a model's loop block, dense (`loop_step`, every position) against
`loop_step_at` (only the active positions as queries and through the MLP, keys and values of
all), at several active fractions. For each fraction: the FLOPs each ran (counted by torch's
FlopCounterMode), the wall time (median of interleaved repeats), and the two ratios side by
side from one run -- a time ratio near the FLOPs ratio means the gather/scatter costs little.
Run by hand (CPU: keep it niced):

    nice -n 10 .venv/bin/python benchmarks/token_halting.py                       # tiny preset, CPU
    .venv/bin/python benchmarks/token_halting.py --preset paper-owt --device cuda --batch 16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from loopmdm.config import load_config
from loopmdm.model.denoiser import LoopedDenoiser


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=0, help="default: the preset's data.seq_len")
    parser.add_argument("--fractions", default="1,0.5,0.25,0.1", help="active fractions of the positions")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: shared machine)")
    parser.add_argument("--vocab", type=int, default=2048, help="vocabulary where the preset leaves it to the tokenizer")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_config(args.preset, ["train.device=" + args.device])
    if cfg.model.vocab_size <= 0:  # set by the tokenizer at training time
        cfg.model = dataclasses.replace(cfg.model, vocab_size=args.vocab)
    model = LoopedDenoiser(cfg.model).to(device).eval()
    with torch.no_grad():  # adaLN-Zero would make every block the identity: give it weights
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    B, L = args.batch, args.seq_len or cfg.data.seq_len
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.model.vocab_size, (B, L), generator=g).to(device)
    fractions = [float(f) for f in args.fractions.split(",")]
    with torch.no_grad():
        c = model.condition(torch.full((B,), 0.5, device=device), B, device)
        h = model.run_prelude(x, c)
        masks = {}
        for f in fractions:  # the same number of active positions in every row, at random places
            order = torch.rand(B, L, generator=g).argsort(1)
            masks[f] = (order < max(1, round(f * L))).to(device)
        dense_flops = _flops(lambda: model.loop_step(h, c))
        runs = {"dense": lambda: model.loop_step(h, c)}
        runs.update({f: (lambda m=m: model.loop_step_at(h, c, m)) for f, m in masks.items()})
        for fn in runs.values():  # warm-up
            fn()
        times = {k: [] for k in runs}
        for _ in range(args.repeats):  # interleaved, so drift from other jobs hits every arm alike
            for k, fn in runs.items():
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                times[k].append(time.perf_counter() - start)
        dense_s = statistics.median(times["dense"])
        rows = []
        for f in fractions:
            flops = _flops(runs[f])
            sec = statistics.median(times[f])
            rows.append({"active": f, "flops_ratio": flops / dense_flops, "time_ratio": sec / dense_s,
                         "ms": 1e3 * sec})
    print(json.dumps({"preset": args.preset, "batch": B, "seq_len": L, "d_model": cfg.model.d_model,
                      "loop_layers": cfg.model.n_loop_layers, "device": str(device), "threads": args.threads,
                      "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                      "dense_ms": 1e3 * dense_s, "rows": rows}, indent=1))
    print(f"\n| active | FLOPs ratio | time ratio | ms (dense {1e3 * dense_s:.1f}) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['active']:g} | {r['flops_ratio']:.3f} | {r['time_ratio']:.3f} | {r['ms']:.1f} |")


if __name__ == "__main__":
    main()
