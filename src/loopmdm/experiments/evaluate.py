"""Evaluate one finished run of a suite, once (cached in RUN/eval.json)."""

from __future__ import annotations

import json

import torch

from loopmdm import checkpoint as ckpt
from loopmdm.data.loader import eval_rows
from loopmdm.runfiles import write_text_atomic

T_BINS = [0.0, 0.25, 0.5, 0.75, 1.0]  # NELBO split by the noise level drawn (paper: gains at mid t)


def _val_curve(run_dir) -> list[dict]:
    """(step, flops, epoch, val_nll) of every validation record of the run, in order."""
    curve = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("kind") == "val":
            curve.append({"step": rec["step"], "flops": rec["flops"], "val_nll": rec["val_nll"],
                          **({"epoch": rec["epoch"]} if "epoch" in rec else {})})
    return curve


def _mask_attention(run, data, log) -> dict | None:
    """Mask->mask attention per layer (and per loop iteration) on 2 validation batches; a task's
    prompt is never masked (as in training)."""
    from loopmdm.analysis.attention import mask_attention_by_layer

    try:
        return mask_attention_by_layer(run.model, data.blocks("val"), run.cfg, run.device,
                                       prompt_len=data.prompt_len, prompt_sep_id=data.prompt_sep_id)
    except Exception as exc:  # a diagnostic: never lose an evaluation over it
        log(f"mask attention skipped: {type(exc).__name__}: {exc}")
        return None


def evaluate_run(suite, spec, scale, log) -> dict:
    path = spec.out_dir / "eval.json"
    if path.is_file():
        return json.loads(path.read_text())
    from loopmdm.diffusion.schedule import make_schedule
    from loopmdm.evaluation.nelbo import evaluate_nelbo
    from loopmdm.evaluation.solve import solve_task, task_test_set
    from loopmdm.runs import load_run

    device = "cpu" if not torch.cuda.is_available() else "auto"
    run = load_run(spec.out_dir, device=device)
    data = run.prepared_data()
    best = ckpt.read_best_info(spec.out_dir) if data.has_split("test") else None
    if best is not None:
        # The regime suites: the weights of the best validation NELBO (early stopping), scored on
        # the test split, which no choice has seen.
        run = load_run(spec.out_dir, device=device, best=True)
    loops = list(suite.loops) if run.model.is_looped else [1]
    train = json.loads((spec.out_dir / "train_summary.json").read_text())
    result = {"arm": spec.arm, "seed": spec.seed, "lr": spec.lr, "step": train["step"], "flops": train["flops"],
              "train_time": train["train_time"], "val_curve": _val_curve(spec.out_dir),
              "params": sum(p.numel() for p in run.model.parameters())}
    log(f"eval  {spec.name} at S = {loops}")
    if suite.kind == "task":
        test = task_test_set(data, scale.num_test, seed=0, split="test" if data.has_split("test") else "val")
        result["orders"] = {order: solve_task(run.model, data, test, loops, order, run.device,
                                              precision=run.cfg.train.precision)
                            for order in suite.orders}
    cfg = run.cfg
    if best is not None:
        result["best"] = best
        result["epochs"] = train.get("epochs")
        result["test_nelbo"] = evaluate_nelbo(
            run.model, data.blocks("test"), make_schedule(cfg.diffusion.schedule, cfg.diffusion.eps), loops,
            eps=cfg.diffusion.eps, batch_size=cfg.eval.batch_size, num_batches=scale.num_test, seed=cfg.eval.seed,
            device=run.device, precision=cfg.train.precision, t_bins=T_BINS)
        result["test_unigram_xent"] = data.unigram_xent(data.blocks("test")[eval_rows(
            len(data.blocks("test")), cfg.eval.batch_size, scale.num_test)])
    # every arm, every suite: the MDM's and deeper MDM's per layer beside LoopMDM's per iteration
    result["mask_attention"] = _mask_attention(run, data, log)
    result["nelbo"] = evaluate_nelbo(run.model, data.blocks("val"), make_schedule(cfg.diffusion.schedule, cfg.diffusion.eps),
                                     loops, eps=cfg.diffusion.eps, batch_size=cfg.eval.batch_size,
                                     num_batches=scale.num_test if suite.kind == "lm" else 8,
                                     seed=cfg.eval.seed, prompt_len=data.prompt_len, prompt_sep_id=data.prompt_sep_id, device=run.device,
                                     precision=cfg.train.precision, t_bins=T_BINS)
    write_text_atomic(path, json.dumps(result, indent=1) + "\n")
    return result
