"""What each loop iteration does: one pass over the loop, read out after every iteration.

For a batch of validation sequences, one draw of (t, x_t) per sequence — the same draws
`evaluate_nelbo` makes with the same seed — the prelude runs once and the loop is iterated
through the model's own driver `iterate_loop` up to `max_loops` times. After iteration k:

- rel_change_masked / _unmasked: mean over positions of ||H^k - H^{k-1}|| / ||H^{k-1}||
  (norms over the hidden dimension), masked and unmasked (non-pad) positions separately;
- nelbo: the validation bound per token when the coda reads H^k (= the bound at S = k),
  also split by bins of t (nelbo_by_t);
- mask_to_mask / mask_to_unmasked: per looped layer, the softmax mass a masked query puts on
  masked (unmasked) keys, averaged over heads, over the masked queries of a sequence, then
  over sequences (also by t bin); masked_key_frac is what uniform attention would give;
- gates: mean |gate_attn| and |gate_mlp| of each looped DiT layer's adaLN output (they depend
  on c only, so on t for a time-conditioned model and not at all otherwise, never on k).

Every number written is finite JSON: an empty average (e.g. a t bin no sequence fell in)
is null.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch

from loopmdm.data.loader import iter_eval_batches
from loopmdm.devices import autocast_context
from loopmdm.diffusion.objective import forward_mask, maskable_after, sample_times, weighted_token_nll
from loopmdm.diffusion.schedule import NoiseSchedule
from loopmdm.errors import require
from loopmdm.model.denoiser import relative_change

DEFAULT_T_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)


def finite_json(value):
    """`value` with every non-finite float (and numpy scalar) turned into a JSON-safe value."""
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return finite_json(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def _ratio(num, den):
    """num / den elementwise (numpy), NaN where den == 0 (finite_json makes it null)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def check_t_bins(t_bins) -> list[float]:
    edges = [float(e) for e in t_bins]
    require(len(edges) >= 2 and all(a < b for a, b in zip(edges, edges[1:])) and edges[0] <= 0.0 <= 1.0 <= edges[-1],
            f"t_bins {edges} must be increasing edges from 0 to 1, e.g. {list(DEFAULT_T_BINS)}")
    return edges


@contextmanager
def attention_probes(model, make_probe):
    """Set `attn.probe = make_probe(i)` on the i-th looped layer (explicit attention) for the
    duration of the block; always removed again."""
    layers = list(model.loop_block)
    try:
        for i, block in enumerate(layers):
            block.attn.probe = make_probe(i)
        yield
    finally:
        for block in layers:
            block.attn.probe = None


@torch.no_grad()
def loop_diagnostics(model, blocks: np.ndarray, schedule: NoiseSchedule, *, eps: float, max_loops: int,
                     batch_size: int = 32, num_batches: int = 2, seed: int = 1234, prompt_len: int = 0, prompt_sep_id: int | None = None,
                     t_bins=DEFAULT_T_BINS, device: torch.device | str = "cpu", pad_id: int | None = None,
                     precision: str = "fp32", attention: bool = True) -> dict:
    """Per-iteration diagnostics of a looped model on `num_batches` (0 = all) batches of
    `blocks`; see the module docstring. Deterministic given `seed`."""
    require(getattr(model, "is_looped", False), "loop diagnostics need a looped model (this one has no loop block)")
    require(isinstance(max_loops, int) and max_loops >= 1, f"max_loops={max_loops!r} must be an integer >= 1")
    edges = check_t_bins(t_bins)
    device = torch.device(device)
    K, NL, NB = max_loops, len(model.loop_block), len(edges) - 1
    inner_edges = torch.tensor(edges[1:-1], dtype=torch.float32, device=device)
    gated = model.cfg.block == "dit"

    nll = np.zeros((K, NB))  # weighted NLL sums
    tokens, sequences = np.zeros(NB), np.zeros(NB)  # scored tokens, sequences per t bin
    rel = np.zeros((K, 2))  # sums of per-position relative changes: masked, unmasked
    rel_count = np.zeros(2)
    hidden_norm, norm_count = np.zeros(K), 0.0
    attn = np.zeros((K, NL, 2, NB))  # per-sequence means: mask->mask, mask->unmasked
    attn_count, key_frac = np.zeros(NB), np.zeros(NB)  # sequences with a masked query
    gates = np.zeros((NL, 2, NB))

    def by_bin(values: torch.Tensor, bins: torch.Tensor, keep: torch.Tensor | None = None) -> np.ndarray:
        values = values.double()
        if keep is not None:
            values, bins = values[keep], bins[keep]
        return torch.zeros(NB, dtype=torch.float64, device=values.device).index_add_(0, bins, values).cpu().numpy()

    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    for x0 in iter_eval_batches(blocks, batch_size, num_batches):
        x0 = x0.to(device)
        B = x0.shape[0]
        valid = (x0 != pad_id) if pad_id is not None and bool((x0 == pad_id).any()) else None
        maskable = maskable_after(prompt_len, x0, prompt_sep_id)
        # The same draws, in the same order, as diffusion_loss inside evaluate_nelbo.
        t = sample_times(B, eps, True, generator, device)
        x_t, masked = forward_mask(x0, t, schedule, model.mask_id, generator, valid, maskable)
        real = valid if valid is not None else torch.ones_like(masked)
        scored = real if maskable is None else real & maskable
        unmasked = real & ~masked
        bins = torch.bucketize(t, inner_edges, right=True)
        tokens += by_bin(scored.sum(-1), bins)
        sequences += by_bin(torch.ones(B, device=device), bins)
        n_masked = masked.sum(-1)
        has_masked = n_masked > 0
        key_frac += by_bin(n_masked / real.sum(-1).clamp_min(1), bins, has_masked)
        attn_count += by_bin(torch.ones(B, device=device), bins, has_masked)
        rel_count += [float(masked.sum()), float(unmasked.sum())]
        norm_count += float(real.sum())
        key_masked, key_unmasked, query = masked.float(), unmasked.float(), masked.float()
        pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def make_probe(layer: int):
            def probe(probs: torch.Tensor) -> None:  # (B, H, L, L) float32
                heads = probs.shape[1]
                to_masked = torch.einsum("bhqk,bk->bq", probs, key_masked) / heads
                to_unmasked = torch.einsum("bhqk,bk->bq", probs, key_unmasked) / heads
                per_seq = [(m * query).sum(-1) / query.sum(-1).clamp_min(1) for m in (to_masked, to_unmasked)]
                pending[layer] = (per_seq[0], per_seq[1])
            return probe

        with autocast_context(device, precision):
            c = model.condition(t, B, device)
            if gated and c is not None:
                for i, block in enumerate(model.loop_block):
                    mods = block.adaLN_modulation(c).float().chunk(6, dim=-1)
                    gates[i, 0] += by_bin(mods[2].abs().mean(-1), bins)
                    gates[i, 1] += by_bin(mods[5].abs().mean(-1), bins)
            h0 = model.run_prelude(x_t, c, valid)
            prev = h0
            with attention_probes(model, make_probe) if attention else _nothing():
                for k, h in enumerate(model.iterate_loop(h0, c, valid, K)):
                    ratio = relative_change(h, prev)
                    rel[k] += [float((ratio * masked).sum()), float((ratio * unmasked).sum())]
                    hidden_norm[k] += float((h.float().norm(dim=-1) * real).sum())
                    for layer, (mm, mu) in pending.items():
                        attn[k, layer, 0] += by_bin(mm, bins, has_masked)
                        attn[k, layer, 1] += by_bin(mu, bins, has_masked)
                    pending.clear()
                    logits = model.run_coda(h, c, valid)
                    terms = weighted_token_nll(logits, x0, masked, t, schedule)
                    nll[k] += by_bin(terms.sum(-1), bins)
                    prev = h
    model.train(was_training)

    n_attn = attn_count.sum()
    per_loop = []
    for k in range(K):
        record = {"k": k + 1, "nelbo": _ratio(nll[k].sum(), tokens.sum()), "nelbo_by_t": _ratio(nll[k], tokens),
                  "rel_change_masked": _ratio(rel[k, 0], rel_count[0]),
                  "rel_change_unmasked": _ratio(rel[k, 1], rel_count[1]),
                  "hidden_norm": _ratio(hidden_norm[k], norm_count)}
        if attention:
            record.update({"mask_to_mask": _ratio(attn[k, :, 0].sum(-1), n_attn),
                           "mask_to_unmasked": _ratio(attn[k, :, 1].sum(-1), n_attn),
                           "mask_to_mask_by_t": _ratio(attn[k, :, 0], attn_count[None, :])})
        per_loop.append(record)
    start = model.cfg.loop_start
    result = {
        "loops": K, "loop_layers": list(range(start, start + NL)), "t_bins": edges,
        "sequences": sequences.sum(), "tokens": tokens.sum(), "sequences_by_t": sequences, "tokens_by_t": tokens,
        "seed": seed, "batch_size": batch_size, "num_batches": num_batches,
        "masked_key_frac": _ratio(key_frac.sum(), n_attn), "masked_key_frac_by_t": _ratio(key_frac, attn_count),
        "gates": None if not gated else {
            "attn": _ratio(gates[:, 0].sum(-1), sequences.sum()), "mlp": _ratio(gates[:, 1].sum(-1), sequences.sum()),
            "attn_by_t": _ratio(gates[:, 0], sequences[None, :]), "mlp_by_t": _ratio(gates[:, 1], sequences[None, :])},
        "per_loop": per_loop,
    }
    result = finite_json(result)
    result["sequences"], result["tokens"] = int(sequences.sum()), int(tokens.sum())
    result["sequences_by_t"], result["tokens_by_t"] = [int(x) for x in sequences], [int(x) for x in tokens]
    return result


@contextmanager
def _nothing():
    yield


def compact_record(diag: dict) -> dict:
    """The training-time `loop_diag` record: per-k lists of the headline numbers."""
    rows = diag["per_loop"]
    gates = diag["gates"] or {}
    return finite_json({
        "loops": diag["loops"], "sequences": diag["sequences"], "t_bins": diag["t_bins"],
        "nelbo": [r["nelbo"] for r in rows], "nelbo_by_t": [r["nelbo_by_t"] for r in rows],
        "rel_change": [r["rel_change_masked"] for r in rows],
        "rel_change_unmasked": [r["rel_change_unmasked"] for r in rows],
        "mask_to_mask": [r.get("mask_to_mask") for r in rows], "masked_key_frac": diag["masked_key_frac"],
        "gate_attn": gates.get("attn"), "gate_mlp": gates.get("mlp"),
    })


def format_table(diag: dict) -> str:
    """A readable summary: one row per iteration k, then the gates."""
    bins = diag["t_bins"]
    bin_names = [f"t<{hi:g}" if i < len(bins) - 2 else f"t<={hi:g}" for i, hi in enumerate(bins[1:])]
    layers = diag["loop_layers"]

    def num(x, width=8, digits=4):
        return f"{'-':>{width}}" if x is None else f"{x:>{width}.{digits}f}"

    head = (f"{'k':>3} {'NELBO':>8} " + " ".join(f"{n:>8}" for n in bin_names)
            + f" {'dH/H m':>8} {'dH/H u':>8} {'|H|':>8} " + " ".join(f"{'m->m L' + str(i):>8}" for i in layers))
    lines = [head]
    for r in diag["per_loop"]:
        lines.append(f"{r['k']:>3} {num(r['nelbo'])} " + " ".join(num(v) for v in r["nelbo_by_t"])
                     + f" {num(r['rel_change_masked'])} {num(r['rel_change_unmasked'])} {num(r['hidden_norm'], digits=2)} "
                     + " ".join(num(v) for v in (r.get("mask_to_mask") or [])))
    lines.append(f"sequences per t bin: {dict(zip(bin_names, diag['sequences_by_t']))}; "
                 f"masked key fraction (uniform attention's mask->mask): {num(diag['masked_key_frac'], 0)}")
    if diag["gates"]:
        lines.append("adaLN gates (mean |gate|): " + ", ".join(
            f"L{i} attn {num(a, 0)} mlp {num(m, 0)}" for i, a, m in zip(layers, diag["gates"]["attn"], diag["gates"]["mlp"])))
    return "\n".join(lines)
