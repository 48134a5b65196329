"""Validation NELBO per token and the perplexity bound, at any number of loops.

MDLM's estimator: one t per sequence, antithetic across the eval batch, averaged over the
split in float64; PPL <= exp(NELBO). `draws` > 1 repeats each batch with fresh (t, mask)
draws (SMDM/LLaDA average 128). Every loop count sees the same draws — the generator is
reseeded per S — so differences between loop counts are paired, not noise.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch
from tqdm import tqdm

from loopmdm.data.loader import eval_rows, iter_eval_batches
from loopmdm.devices import autocast_context
from loopmdm.diffusion.objective import diffusion_loss, maskable_after
from loopmdm.diffusion.schedule import NoiseSchedule
from loopmdm.errors import require
from loopmdm.evaluation.judge import ar_loss


@torch.no_grad()
def evaluate_nelbo(model, blocks: np.ndarray, schedule: NoiseSchedule, loops: list[int], *, eps: float,
                   batch_size: int = 32, num_batches: int = 0, draws: int = 1, seed: int = 1234,
                   pad_id: int | None = None, prompt_len: int = 0, prompt_sep_id: int | None = None, device: torch.device | str = "cpu",
                   precision: str = "fp32", progress: bool = False, t_bins: list[float] | None = None) -> list[dict]:
    """One record per loop count: {loops, nll, ppl, tokens, sequences, draws, seed}. With
    `progress`, a bar on stderr once the evaluation has run for 2 s. With `t_bins` (edges,
    e.g. [0, 0.25, 0.5, 0.75, 1]) also `by_t`: the NELBO of the sequences whose drawn t falls
    in each bin, per scored token of those sequences (the paper finds the loop's gain at
    intermediate noise levels)."""
    if t_bins is not None:
        require(len(t_bins) >= 2 and all(a < b for a, b in zip(t_bins, t_bins[1:])) and t_bins[0] <= 0 <= 1 <= t_bins[-1],
                f"t_bins={list(t_bins)} must be increasing edges from <= 0 to >= 1")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    results = []
    n_batches = math.ceil(len(eval_rows(len(blocks), batch_size, num_batches)) / batch_size) if batch_size > 0 else 0
    bar = tqdm(total=len(loops) * n_batches, desc="eval", unit="batch", delay=2.0, file=sys.stderr,
               disable=not progress, dynamic_ncols=True, leave=False)
    # A causal model (the autoregressive judge, evaluation/judge.py) is scored by its exact
    # next-token NLL; everything else by the diffusion NELBO.
    causal = getattr(getattr(model, "cfg", None), "causal", False)
    loss_fn = (lambda m, x, *_, **kw: ar_loss(m, x, kw.get("valid"))) if causal else diffusion_loss
    for num_loops in loops:
        bar.set_postfix(S=num_loops)
        generator = torch.Generator(device=device).manual_seed(seed)
        nll_sum, tokens, sequences = 0.0, 0, 0  # python floats are float64
        n_bins = len(t_bins) - 1 if t_bins is not None else 0
        bin_nll, bin_tokens = np.zeros(n_bins), np.zeros(n_bins)
        for x0 in iter_eval_batches(blocks, batch_size, num_batches):
            x0 = x0.to(device)
            valid = (x0 != pad_id) if pad_id is not None and bool((x0 == pad_id).any()) else None
            for _ in range(draws):
                with autocast_context(device, precision):
                    out = loss_fn(model, x0, schedule, num_loops=num_loops, eps=eps,
                                         antithetic=True, generator=generator, valid=valid,
                                         maskable=maskable_after(prompt_len, x0, prompt_sep_id))
                nll_sum += float(out.nll_sum.double())
                if n_bins:
                    which = np.clip(np.searchsorted(t_bins, out.t.double().cpu().numpy(), side="right") - 1, 0, n_bins - 1)
                    np.add.at(bin_nll, which, out.seq_nll.double().cpu().numpy())
                    np.add.at(bin_tokens, which, out.seq_tokens.double().cpu().numpy())
            tokens += out.num_tokens
            sequences += x0.shape[0]
            bar.update(1)
        nll = nll_sum / max(tokens * draws, 1)
        results.append({"loops": num_loops, "nll": nll, "ppl": math.exp(min(nll, 700.0)),
                        "tokens": tokens, "sequences": sequences, "draws": draws, "seed": seed})
        if n_bins:
            results[-1]["by_t"] = {f"[{lo:g},{hi:g})": (float(bin_nll[i] / bin_tokens[i]) if bin_tokens[i] else None)
                                   for i, (lo, hi) in enumerate(zip(t_bins, t_bins[1:]))}
    bar.close()
    model.train(was_training)
    return results
