"""Does looping add hidden cost? Training-step time at S loops vs the analytic FLOPs ratio.

For each S we time full training steps (forward, NELBO, backward, clip, AdamW) on a fixed
batch and compare time(S) / time(1) with train_flops(S) / train_flops(1) from
loopmdm.model.flops. A ratio of ratios near 1 means a loop iteration costs what its FLOPs
say: no extra copies, syncs or Python overhead. Run by hand:

    .venv/bin/python benchmarks/loop_overhead.py                      # tiny preset, CPU
    .venv/bin/python benchmarks/loop_overhead.py --preset paper-owt --device cuda --batch 8
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from train_step import make_train_step

from loopmdm.config import load_config
from loopmdm.model.denoiser import LoopedDenoiser
from loopmdm.model.flops import train_flops
from loopmdm.training.allocator import tune_glibc_malloc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--loops", default="1,6,12")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=0, help="default: the preset's data.seq_len")
    parser.add_argument("--vocab", type=int, default=0, help="default: the preset's BPE vocabulary (2048 for tiny)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="", help="fp32 | bf16 (default: the preset's train.precision)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                        help="tuned: what `loopmdm` does on Linux (training/allocator.py); default: glibc as is")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    malloc_tuned = tune_glibc_malloc() if args.malloc == "tuned" else False

    cfg = load_config(args.preset)
    seq_len = args.seq_len or cfg.data.seq_len
    cfg.model.vocab_size = args.vocab or {"bpe": cfg.data.bpe_vocab_size, "gpt2": 50258,
                                           "bert-base-uncased": 30522}[cfg.data.tokenizer]
    cfg.model.dropout = 0.0
    precision = args.precision or cfg.train.precision
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = LoopedDenoiser(cfg.model).to(device)
    step = make_train_step(model, cfg, device, precision, args.batch, seq_len)

    loops = [int(s) for s in args.loops.split(",")]
    for s in loops:  # warm-up: allocator, kernels, caches
        step(s)
    times = {s: [] for s in loops}
    for _ in range(args.repeats):  # interleave S so drift in machine speed hits all equally
        for s in loops:
            t0 = time.perf_counter()
            step(s)
            times[s].append(time.perf_counter() - t0)
    base_s = loops[0]
    base_time = statistics.median(times[base_s])
    base_flops = train_flops(cfg.model, seq_len, base_s)
    rows = []
    for s in loops:
        t = statistics.median(times[s])
        flops = train_flops(cfg.model, seq_len, s)
        rows.append({"loops": s, "step_seconds": t, "time_ratio": t / base_time, "flops_ratio": flops / base_flops,
                     "ratio_of_ratios": (t / base_time) / (flops / base_flops),
                     "achieved_gflops": args.batch * flops / t / 1e9})
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    report = {"preset": args.preset, "device": machine, "precision": precision, "batch": args.batch,
              "seq_len": seq_len, "vocab": cfg.model.vocab_size, "loop_layers": [cfg.model.loop_start, cfg.model.loop_end],
              "n_layers": cfg.model.n_layers, "d_model": cfg.model.d_model, "repeats": args.repeats,
              "malloc_tuned": malloc_tuned, "rows": rows}
    if args.json:
        print(json.dumps(report))
        return
    print(f"{args.preset}: {cfg.model.n_layers}x{cfg.model.d_model}, loop layers [{cfg.model.loop_start}, "
          f"{cfg.model.loop_end}), batch {args.batch} x {seq_len}, vocab {cfg.model.vocab_size}, {precision}, {machine}, "
          f"malloc {'tuned' if malloc_tuned else 'default'}")
    print(f"{'S':>4} {'s/step':>9} {'time ratio':>11} {'FLOPs ratio':>12} {'time/FLOPs':>11} {'GFLOP/s':>9}")
    for r in rows:
        print(f"{r['loops']:>4} {r['step_seconds']:>9.3f} {r['time_ratio']:>11.3f} {r['flops_ratio']:>12.3f} "
              f"{r['ratio_of_ratios']:>11.3f} {r['achieved_gflops']:>9.1f}")


if __name__ == "__main__":
    main()
