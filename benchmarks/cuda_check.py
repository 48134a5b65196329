"""One-shot accelerator check, prepared for a session that is lent a GPU (run by hand).

    PYTHONPATH=src python3 benchmarks/cuda_check.py --out $OUT          # on the GPU machine
    .venv/bin/python benchmarks/cuda_check.py --device cpu --quick      # dry run here

Checks (each prints PASS/FAIL and goes into OUT/cuda_check.json):
1. numerics: the paper-size DiT's loss in bf16 autocast on the device vs fp32 on the same
   device, same weights and draws (|diff| small), and looped logits finite at S = 24;
2. training: 20 steps of the `tiny` config on the device (loss finite and falling, S drawn);
3. sampling: the cache sampler equals the ancestral sampler token for token on the device;
4. speed: training-step time at S = 1, 6, 12 for the paper-owt model (12 x 768, seq 1024,
   GPT-2 vocabulary), tokens/s and model FLOPs utilisation against the device's bf16 peak;
5. compile: per-block torch.compile (training/speed.py) trains at S = 1, 3, 5, 2 with no
   recompilation after the first step, and its first loss matches eager;
6. sdpa: attention at the paper's shapes under bf16 runs on the flash kernel (and, with a
   padding key mask, on the memory-efficient kernel), forward and backward.
(benchmarks/throughput.py measures throughput, MFU and memory: eager/compiled, checkpointing.)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from loopmdm.config import load_config
from loopmdm.devices import autocast_context
from loopmdm.diffusion.objective import diffusion_loss
from loopmdm.diffusion.schedule import make_schedule
from loopmdm.model.denoiser import LoopedDenoiser
from loopmdm.model.flops import train_flops
from loopmdm.sampling.samplers import sample
from loopmdm.training.allocator import tune_glibc_malloc

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 TFLOP/s, SXM parts


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def paper_model(preset: str, device, quick: bool):
    cfg = load_config(preset)
    cfg.model.vocab_size = 50258 if cfg.data.tokenizer == "gpt2" else 30522
    cfg.model.dropout = 0.0
    if quick:  # CPU dry run: same code, small sizes
        cfg.model.n_layers, cfg.model.d_model, cfg.model.n_heads, cfg.model.vocab_size = 4, 64, 4, 512
    torch.manual_seed(0)
    return cfg, LoopedDenoiser(cfg.model).to(device)


def check_numerics(device, quick) -> dict:
    cfg, model = paper_model("paper-owt", device, quick)
    sched = make_schedule("loglinear")
    x0 = torch.randint(0, cfg.model.vocab_size, (4, 128), device=device)
    with torch.no_grad():
        for p in model.parameters():  # leave the zero-init regime
            p.add_(0.02 * torch.randn_like(p))
        losses = {}
        for precision in ("fp32", "bf16"):
            g = torch.Generator(device=device).manual_seed(0)
            with autocast_context(device, precision):
                losses[precision] = float(diffusion_loss(model, x0, sched, num_loops=6, eps=1e-3, generator=g).loss)
        logits = model(x0, num_loops=24)
    diff = abs(losses["fp32"] - losses["bf16"])
    ok = diff < 0.05 * abs(losses["fp32"]) and bool(torch.isfinite(logits).all())
    return {"ok": ok, "loss_fp32": losses["fp32"], "loss_bf16": losses["bf16"], "abs_diff": diff}


def check_training(device, quick, out: Path) -> dict:
    from loopmdm.training.run import train

    cfg = load_config("tiny", [f"train.out_dir={out / 'cuda-check-run'}", "train.max_steps=20", "train.max_minutes=0",
                               f"train.device={device.type}", "train.precision=auto", "train.log_every=5",
                               "train.eval_every=0", "train.checkpoint_every=20", "train.progress=false",
                               "train.warmup_steps=5", "train.eval_batches=2"])
    summary = train(cfg, overwrite=True, progress_print=lambda *_: None)
    records = [json.loads(x) for x in (out / "cuda-check-run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    ok = all(map(lambda v: v == v, losses)) and losses[-1] < losses[0]
    return {"ok": ok, "losses": losses, "val_nll": summary["val_nll"]}


def check_sampling(device, quick) -> dict:
    cfg, model = paper_model("paper-owt", device, True)  # small: exactness, not speed
    model.eval()

    def denoiser(x, n, t):
        with autocast_context(device, "fp32"):
            return model(x, num_loops=n, t=t).float()

    results = {}
    for sampler in ("ancestral", "cache"):
        g = torch.Generator(device=device).manual_seed(0)
        results[sampler] = sample(denoiser, mask_id=model.mask_id, seq_len=64, batch_size=4, steps=128, loops=4,
                                  sampler=sampler, schedule=make_schedule("loglinear"), generator=g, device=device)
    same = torch.equal(results["ancestral"].tokens, results["cache"].tokens)
    return {"ok": same, "nfe_ancestral": results["ancestral"].nfe, "nfe_cache": results["cache"].nfe}


def check_speed(device, quick, batch: int, repeats: int) -> dict:
    cfg, model = paper_model("paper-owt", device, quick)
    seq_len = 128 if quick else cfg.data.seq_len
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    sched = make_schedule("loglinear")
    x0 = torch.randint(0, cfg.model.vocab_size, (batch, seq_len), device=device)
    g = torch.Generator(device=device).manual_seed(0)

    def step(s):
        with autocast_context(device, "bf16" if device.type == "cuda" else "fp32"):
            out = diffusion_loss(model, x0, sched, num_loops=s, eps=1e-3, generator=g)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    loops = [1, 6, 12]
    for s in loops:
        step(s)
    times = {s: [] for s in loops}
    for _ in range(repeats):
        for s in loops:
            t0 = time.perf_counter()
            step(s)
            times[s].append(time.perf_counter() - t0)
    peak = peak_flops(device)
    rows = []
    for s in loops:
        t = statistics.median(times[s])
        flops = batch * train_flops(cfg.model, seq_len, s)
        rows.append({"loops": s, "step_seconds": t, "tokens_per_sec": batch * seq_len / t,
                     "time_ratio": t / statistics.median(times[1]),
                     "flops_ratio": flops / (batch * train_flops(cfg.model, seq_len, 1)),
                     "mfu": flops / t / peak if peak else None})
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    ok = all(abs(r["time_ratio"] / r["flops_ratio"] - 1) < 0.10 for r in rows)
    return {"ok": ok, "batch": batch, "seq_len": seq_len, "rows": rows, "max_memory_gib": mem}


def check_compile(device, quick) -> dict:
    """Dynamo's graph count after each training step at S = 1, 3, 5, 2 stays at its first value."""
    from torch._dynamo.utils import counters

    from loopmdm.config import ModelConfig
    from loopmdm.training.speed import compile_blocks

    torch._dynamo.reset()
    counters.clear()
    cfg = ModelConfig(vocab_size=512, n_layers=4, d_model=128, n_heads=4, cond_dim=32, loop_start=1, loop_end=3)
    torch.manual_seed(0)
    eager = LoopedDenoiser(cfg).to(device).train()
    with torch.no_grad():
        for p in eager.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model = copy.deepcopy(eager)
    compile_blocks(model, backend="aot_eager" if quick else "inductor")  # quick: the CPU dry run
    sched = make_schedule("loglinear")
    x0 = torch.randint(0, 512, (8, 128), device=device)
    losses, graphs = {}, []
    for name, m in (("eager", eager), ("compiled", model)):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        for i, s in enumerate([1, 3, 5, 2]):
            g = torch.Generator(device=device).manual_seed(i)
            with autocast_context(device, "fp32"):
                loss = diffusion_loss(m, x0, sched, num_loops=s, eps=1e-3, generator=g).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.setdefault(name, []).append(float(loss.detach()))
            if name == "compiled":
                graphs.append(counters["stats"]["unique_graphs"])
    diff = max(abs(a - b) for a, b in zip(losses["eager"], losses["compiled"]))
    ok = graphs[0] > 0 and graphs == [graphs[0]] * 4 and diff < 1e-2 * abs(losses["eager"][0])
    return {"ok": ok, "graphs_after_each_step": graphs, "max_loss_diff": diff, "losses": losses,
            "graph_breaks": sum(counters["graph_break"].values())}


def check_sdpa(device, quick) -> dict:
    """Forcing one SDPA backend raises if it cannot run these inputs: a pass means the fast
    kernel is the one used (dropout 0, bf16, head dim 64)."""
    if device.type != "cuda":
        return {"ok": True, "skipped": "flash / memory-efficient kernels are CUDA kernels"}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg, model = paper_model("paper-owt", device, quick)
    block = model.loop_block[0]
    x = torch.randn(2, 1024, cfg.model.d_model, device=device, requires_grad=True)
    c = model.condition(None, 2, device)
    key_mask = torch.ones(2, 1024, dtype=torch.bool, device=device)
    key_mask[1, 900:] = False
    used = {}
    for backend, mask in ((SDPBackend.FLASH_ATTENTION, None), (SDPBackend.EFFICIENT_ATTENTION, key_mask)):
        with sdpa_kernel([backend]), autocast_context(device, "bf16"):
            block(x, c, model.rotary, mask).float().square().mean().backward()
        used[backend.name] = "forward+backward"
    return {"ok": True, "kernels": used}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="cuda_check_out")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a CPU dry run of this script)")
    args = parser.parse_args()
    tune_glibc_malloc()
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = {"device": name, "torch": torch.__version__}
    checks = [("numerics", lambda: check_numerics(device, args.quick)),
              ("training", lambda: check_training(device, args.quick, out)),
              ("sampling", lambda: check_sampling(device, args.quick)),
              ("speed", lambda: check_speed(device, args.quick, 2 if args.quick else args.batch, args.repeats)),
              ("compile", lambda: check_compile(device, args.quick)),
              ("sdpa", lambda: check_sdpa(device, args.quick))]
    for label, fn in checks:
        t0 = time.perf_counter()
        try:
            result = fn()
        except Exception as exc:  # report and go on: one failed check must not hide the others
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        result["seconds"] = round(time.perf_counter() - t0, 1)
        report[label] = result
        print(f"{'PASS' if result['ok'] else 'FAIL'} {label}: {json.dumps(result)}", flush=True)
    (out / "cuda_check.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
