"""Training throughput: tokens/s, model FLOPs utilisation and peak memory per loop count S,
eager vs per-block torch.compile, with and without per-iteration activation checkpointing.

Each (mode, checkpointing) pair runs in its own process (fresh compile caches and memory
high-water mark) over S = 1, 6, 12 and S drawn per step as in training (training/loops.py).
A step is a full training step: forward, MDLM NELBO, backward, clipping, AdamW.

- FLOPs: analytic (model/flops.py `train_flops`) at the S of each step, i.e. at the
  effective depth L + (S - 1) * n_loop_layers; recomputation under checkpointing is not
  counted (MFU counts model FLOPs, as PaLM's MFU does).
- MFU: FLOP/s over the device's dense bf16 peak (PEAK_BF16 below); on CPU only FLOP/s.
- Peak memory: CUDA torch.cuda.max_memory_allocated, reset before each S. CPU: peak
  resident set size (ru_maxrss) minus the RSS before the model was built, i.e. weights,
  gradients, AdamW state, activations and allocator slack; a process's high-water mark
  cannot be reset, so S runs in increasing order and each CPU figure is the peak up to
  that S (for `drawn`, run last: the peak over all). In compiled runs it also holds the
  compiler's own memory.

    python benchmarks/throughput.py --preset paper-owt --device cuda --out OUT   # GPU
    python benchmarks/throughput.py --preset tiny --device cpu                  # CPU mode
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from train_step import make_train_step

from loopmdm.config import load_config
from loopmdm.devices import (
    configure_matmul_precision,
    describe_machine,
)
from loopmdm.model.denoiser import LoopedDenoiser
from loopmdm.model.flops import train_flops
from loopmdm.training.allocator import tune_glibc_malloc
from loopmdm.training.loops import train_num_loops
from loopmdm.training.speed import compile_blocks

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s, SXM parts
VOCAB = {"gpt2": 50258, "bert-base-uncased": 30522}  # + 1 for GPT-2's added pad: MDLM's 50258


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def rss_bytes() -> int:
    with open("/proc/self/statm", encoding="utf-8") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def loop_plan(spec: str, s_max: int, steps: int, offset: int) -> list[int]:
    """The S of each step: a fixed S, or `drawn` = S ~ U{1..S_max} from (seed 0, step)."""
    if spec == "drawn":
        return [train_num_loops(offset + i, 0, s_max) for i in range(steps)]
    return [int(spec)] * steps


def tensor_peak(step, num_loops: int, model, optimizer, x0, device) -> int:
    """Peak bytes of live tensors over one more training step, by storage (torch's MemTracker:
    weights, gradients, AdamW state, activations, temporaries); eager only, any device."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model, optimizer, x0)
    with tracker:
        step(num_loops)
    return tracker.get_tracker_snapshot("peak")[device]["Total"]


def worker(args) -> dict:
    """One (mode, checkpointing) pair over every S; returns its rows."""
    tune_glibc_malloc()  # as `loopmdm` does at start-up (training/allocator.py)
    device = torch.device(args.device)
    rss_before = rss_bytes()
    cfg = load_config(args.preset)
    seq_len = args.seq_len or cfg.data.seq_len
    cfg.model.vocab_size = args.vocab or VOCAB.get(cfg.data.tokenizer, cfg.data.bpe_vocab_size)
    cfg.model.checkpoint_loops = args.checkpoint == "on"
    precision = args.precision or ("bf16" if device.type == "cuda" else cfg.train.precision)
    tf32 = configure_matmul_precision(device, precision)
    torch.manual_seed(0)
    model = LoopedDenoiser(cfg.model).to(device).train()
    if args.mode == "compiled":
        compile_blocks(model, backend=args.compile_backend)
    step = make_train_step(model, cfg, device, precision, args.batch, seq_len)

    from torch._dynamo.utils import counters

    s_max = cfg.model.max_train_loops if cfg.model.is_looped else 1
    peak = peak_flops(device)
    rows = []
    for spec in args.loops.split(","):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        warm = loop_plan(spec, s_max, args.warmup, 1000)
        t0 = time.perf_counter()
        for s in warm:  # the first step of a compiled run compiles
            step(s)
        warmup_seconds = time.perf_counter() - t0
        plan = loop_plan(spec, s_max, args.repeats, 0)
        times = []
        for s in plan:
            t0 = time.perf_counter()
            step(s)
            times.append(time.perf_counter() - t0)
        total = sum(times)
        flops = sum(args.batch * train_flops(cfg.model, seq_len, s) for s in plan)
        if device.type == "cuda":
            memory = torch.cuda.max_memory_allocated(device)
        else:
            memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
        tensor_memory = tensor_peak(step, plan[0], model, optimizer, x0, device) if args.tensor_memory else None
        rows.append({"mode": args.mode, "checkpoint": args.checkpoint, "loops": spec,
                     "loops_run": plan, "mean_loops": statistics.mean(plan),
                     "step_seconds": statistics.median(times) if spec != "drawn" else total / len(plan),
                     "tokens_per_sec": len(plan) * args.batch * seq_len / total,
                     "flops_per_sec": flops / total, "mfu": flops / total / peak if peak else None,
                     "peak_memory_bytes": memory, "peak_tensor_bytes": tensor_memory, "warmup_seconds": warmup_seconds,
                     "graphs": counters["stats"]["unique_graphs"]})
    return {"preset": args.preset, "device": describe_machine(device), "precision": precision, "tf32": tf32,
            "batch": args.batch, "seq_len": seq_len, "vocab": cfg.model.vocab_size, "dropout": cfg.model.dropout,
            "model": f"{cfg.model.block} {cfg.model.n_layers}x{cfg.model.d_model}, loop "
                     f"[{cfg.model.loop_start}, {cfg.model.loop_end}), S_max {s_max}",
            "memory_measure": "torch.cuda.max_memory_allocated" if device.type == "cuda"
            else "peak RSS minus RSS before the model was built (running peak: S in the order run)",
            "peak_bf16_flops": peak, "rows": rows}


def markdown(report: dict) -> str:
    gpu = report["peak_bf16_flops"] is not None
    tensors = any(r.get("peak_tensor_bytes") is not None for r in report["rows"])
    unit, scale = ("TFLOP/s", 1e12) if report["flops_scale"] == "T" else ("GFLOP/s", 1e9)
    lines = [f"{report['preset']}: {report['model']}, batch {report['batch']} x {report['seq_len']}, "
             f"vocab {report['vocab']}, dropout {report['dropout']}, {report['precision']}, {report['jobs']} run(s) at once"
             f"{' + TF32' if report['tf32'] else ''}; {report['device']}; {report['date']}",
             f"memory: {report['memory_measure']}; compiled = per-block torch.compile, backend "
             f"{report['compile_backend']}; command: `{report['command']}`", "",
             f"| mode | ckpt | S | mean S | s/step | tokens/s | {unit} |{' MFU |' if gpu else ''} peak mem (MiB) |{' tensor peak (MiB) |' if tensors else ''} warm-up s | graphs |",
             f"|---|---|---|---|---|---|---|{'---|' if gpu else ''}---|{'---|' if tensors else ''}---|---|"]
    for r in report["rows"]:
        mfu = f" {100 * r['mfu']:.1f}% |" if gpu else ""
        tensor = f" {r['peak_tensor_bytes'] / 2**20:.0f} |" if tensors else ""
        lines.append(f"| {r['mode']} | {r['checkpoint']} | {r['loops']} | {r['mean_loops']:.2f} | {r['step_seconds']:.3f} | "
                     f"{r['tokens_per_sec']:.0f} | {r['flops_per_sec'] / scale:.1f} |{mfu} "
                     f"{r['peak_memory_bytes'] / 2**20:.0f} |{tensor} {r['warmup_seconds']:.1f} | {r['graphs']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper-owt")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--loops", default="1,6,12,drawn", help="S values in run order; `drawn` = as in training")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--checkpointing", default="off,on", help="per-iteration activation checkpointing")
    parser.add_argument("--batch", type=int, default=0, help="default: 16 on CUDA, 8 on CPU")
    parser.add_argument("--seq-len", type=int, default=0, help="default: the preset's data.seq_len")
    parser.add_argument("--vocab", type=int, default=0, help="default: the preset tokenizer's vocabulary")
    parser.add_argument("--precision", default="", help="default: bf16 on CUDA, the preset's train.precision on CPU")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compiled runs (aot_eager: dynamo only, for dry runs)")
    parser.add_argument("--tensor-memory", action="store_true",
                        help="also the peak of live tensors over one step, by torch's MemTracker (eager only)")
    parser.add_argument("--jobs", type=int, default=1, help="(mode, ckpt) pairs run at once (CPU; keep 1 on a GPU)")
    parser.add_argument("--out", default="", help="folder for throughput.json and throughput.md")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "CKPT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batch = args.batch or (16 if args.device.startswith("cuda") else 8)
    if args.worker:
        args.mode, args.checkpoint = args.worker
        print(json.dumps(worker(args)))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by SIGTERM (time limit): partial results kept"))
    passthrough = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in vars(args).items()
                   if k not in ("worker", "modes", "checkpointing", "out", "jobs") and v is not False]
    pairs = [(mode, ckpt) for mode in args.modes.split(",") for ckpt in args.checkpointing.split(",")]
    state = {"report": None, "failures": []}
    running, t0 = [], time.perf_counter()
    try:
        for i, (mode, ckpt) in enumerate(pairs):
            # --jobs > 1 (CPU only): pairs run side by side, each timed under the same machine load
            running.append((mode, ckpt, subprocess.Popen([sys.executable, __file__, *passthrough, "--worker", mode, ckpt],
                                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
            if len(running) < args.jobs and i < len(pairs) - 1:
                continue
            for mode_, ckpt_, proc in running:
                collect(state, mode_, ckpt_, proc, t0)
                write_outputs(state, args)  # after each pair: a time limit keeps what finished
            running = []
    finally:
        for *_, proc in running:
            if proc.poll() is None:
                proc.kill()
    if state["report"] is None:
        sys.exit(f"every configuration failed: {state['failures']}")
    print(markdown(state["report"]))


def collect(state: dict, mode: str, ckpt: str, proc: subprocess.Popen, t0: float) -> None:
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        state["failures"].append({"mode": mode, "checkpoint": ckpt, "error": stderr.strip().splitlines()[-1:]})
        print(f"{mode} ckpt={ckpt}: FAILED {state['failures'][-1]['error']}", file=sys.stderr, flush=True)
        return
    part = json.loads(stdout.strip().splitlines()[-1])
    print(f"{mode} ckpt={ckpt}: done at {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    if state["report"] is None:
        state["report"] = part
    else:
        state["report"]["rows"] += part["rows"]


def write_outputs(state: dict, args) -> None:
    report = state["report"]
    if report is None:
        return
    report.update(failures=state["failures"], jobs=args.jobs, date=datetime.date.today().isoformat(),
                  compile_backend=args.compile_backend,
                  command=" ".join(["python", "benchmarks/throughput.py", *sys.argv[1:]]),
                  flops_scale="T" if args.device.startswith("cuda") else "G")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "throughput.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "throughput.md").write_text(markdown(report))

if __name__ == "__main__":
    main()
