"""Conditional log-likelihood of a continuation given a context, log p(c | x), for a masked
diffusion LM: the Monte-Carlo estimate of the NELBO bound that SMDM (Nie et al. 2024) and
LLaDA (Nie et al. 2025, Eq. 6 / Alg. 3) use for multiple-choice benchmarks.

The context is never masked; each draw masks part of the continuation only and scores the
model's log-probabilities at the masked positions, weighted as in the NELBO:

* ``llada`` (default) -- mask exactly l of the L continuation tokens (a uniformly random
  subset), l ~ U{1..L}, and weight the masked log-probs by L / l. LLaDA's lower-variance
  form of the same bound; with L = 1 every draw is log p(c | x, c masked) exactly.
* ``mdlm`` -- draw t, mask each continuation token with probability 1 - alpha(t) and weight
  by -alpha'(t) / (1 - alpha(t)) (MDLM Eq. 10; 1/t for the log-linear schedule).

Both draw their l (or t) stratified over the K draws of a request, l_i or t_i from
(i + u_i) / K (MDLM's antithetic sampling), and the estimate is the mean over draws: an
unbiased estimate of the (negative) bound E[...] <= log p(c | x). Each request has its own
generator, seeded from `seed` and its tokens, so a request's estimate does not depend on
the batch it is scored in or on the loop count (draws are paired across S).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from loopmdm.devices import autocast_context
from loopmdm.diffusion.schedule import NoiseSchedule
from loopmdm.errors import require

ESTIMATORS = ("llada", "mdlm")


def request_generator(seed: int, context: list[int], continuation: list[int]) -> torch.Generator:
    """A CPU generator seeded from the run seed and the request's tokens (order-independent)."""
    digest = hashlib.sha256(f"{seed}|{context}|{continuation}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def draw_continuation_masks(num_draws: int, cont_len: int, estimator: str, schedule: NoiseSchedule, eps: float,
                            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masked (K, L) bool over the continuation, weight (K,), t (K,)) for K draws. Only the
    continuation's L positions exist here: the context cannot be masked by construction."""
    require(estimator in ESTIMATORS, f"estimator '{estimator}' is not allowed; choose one of: {', '.join(ESTIMATORS)}")
    require(num_draws >= 1 and cont_len >= 1, f"need >= 1 draws and continuation tokens, got {num_draws} and {cont_len}")
    u = (torch.rand(num_draws, generator=generator, dtype=torch.float64) + torch.arange(num_draws)) / num_draws
    scores = torch.rand(num_draws, cont_len, generator=generator)
    if estimator == "llada":
        count = (u * cont_len).floor().long().clamp(0, cont_len - 1) + 1  # l ~ U{1..L}, stratified
        rank = scores.argsort(dim=1).argsort(dim=1)  # a uniformly random order of the positions
        masked = rank < count[:, None]
        return masked, cont_len / count.double(), count.double() / cont_len
    t = ((1.0 - eps) * u + eps).float()
    masked = scores < schedule.mask_prob(t)[:, None]
    return masked, schedule.loss_weight(t).double(), t.double()


@dataclass
class Scored:
    logprob: float  # the mean over draws of the weighted masked log-probs (<= 0)
    is_greedy: bool  # the argmax of the fully masked continuation is the continuation
    draws: int
    draw_std: float  # standard deviation of the per-draw estimates (Monte-Carlo noise)


def _rows_logits(model, rows: list[torch.Tensor], t: torch.Tensor, num_loops: int, pad_id: int, device,
                 precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad `rows` to one batch and run the denoiser; padding is hidden from attention."""
    L = max(len(r) for r in rows)
    x = torch.full((len(rows), L), pad_id, dtype=torch.long)
    valid = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, r in enumerate(rows):
        x[i, :len(r)] = r
        valid[i, :len(r)] = True
    key_mask = None if bool(valid.all()) else valid.to(device)
    with autocast_context(torch.device(device), precision):
        logits = model(x.to(device), num_loops=num_loops, t=t.float().to(device), key_mask=key_mask)
    return torch.log_softmax(logits.float(), dim=-1), x


@torch.no_grad()
def score_continuations(model, pairs: list[tuple[list[int], list[int]]], *, num_loops: int, num_draws: int,
                        schedule: NoiseSchedule, eps: float = 1e-3, estimator: str = "llada", seed: int = 1234,
                        batch_size: int = 64, max_len: int | None = None, pad_id: int = 0,
                        device: torch.device | str = "cpu", precision: str = "fp32", greedy: bool = True,
                        progress=None) -> list[Scored]:
    """Estimate log p(continuation | context) for each (context ids, continuation ids) pair.
    Sequences longer than `max_len` (the run's seq_len) lose context tokens from the left,
    as lm-eval does for autoregressive models; a continuation alone longer than that keeps
    its last max_len - 1 tokens. All draws of all pairs are batched together, `batch_size`
    rows per denoiser call, shortest first."""
    require(num_draws >= 1, f"mc_samples={num_draws} must be >= 1")
    mask_id = model.mask_id
    rows, owners, weights, ts, targets = [], [], [], [], []
    for k, (context, continuation) in enumerate(pairs):
        require(len(continuation) >= 1, "a continuation must have at least one token")
        if max_len is not None:
            continuation = continuation[-(max_len - 1):] if len(continuation) >= max_len else continuation
            context = context[max(0, len(context) - (max_len - len(continuation))):]
        gen = request_generator(seed, context, continuation)
        x0 = torch.tensor(context + continuation, dtype=torch.long)
        n_ctx, n_cont = len(context), len(continuation)
        masked, weight, t = draw_continuation_masks(num_draws, n_cont, estimator, schedule, eps, gen)
        if greedy:  # one extra row: the whole continuation masked (t = 1)
            masked = torch.cat([masked, torch.ones(1, n_cont, dtype=torch.bool)])
            weight, t = torch.cat([weight, torch.zeros(1, dtype=weight.dtype)]), torch.cat([t, torch.ones(1, dtype=t.dtype)])
        for j in range(len(masked)):
            full = torch.zeros(n_ctx + n_cont, dtype=torch.bool)
            full[n_ctx:] = masked[j]
            rows.append(torch.where(full, torch.full_like(x0, mask_id), x0))
            owners.append((k, j, n_ctx))
            weights.append(float(weight[j]))
            ts.append(float(t[j]))
            targets.append(x0)
    per_draw = [[0.0] * num_draws for _ in pairs]
    greedy_ok = [False] * len(pairs)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        logp, _ = _rows_logits(model, [rows[i] for i in chunk], torch.tensor([ts[i] for i in chunk]), num_loops,
                               pad_id, device, precision)
        logp = logp.cpu()
        for b, i in enumerate(chunk):
            k, j, n_ctx = owners[i]
            x0, x = targets[i], rows[i]
            where = (x == mask_id).nonzero(as_tuple=True)[0]
            if j == num_draws:  # the greedy row
                greedy_ok[k] = bool((logp[b, where].argmax(-1) == x0[where]).all())
            else:
                token_logp = logp[b, where, x0[where]].double().sum()
                per_draw[k][j] = weights[i] * float(token_logp)
        if progress is not None:
            progress(len(chunk))
    out = []
    for k, draws in enumerate(per_draw):
        d = torch.tensor(draws, dtype=torch.float64)
        out.append(Scored(float(d.mean()), greedy_ok[k], num_draws, float(d.std()) if num_draws > 1 else 0.0))
    return out
