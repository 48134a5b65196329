"""MDLM's continuous-time NELBO for absorbing-state (masked) diffusion.

    L = E_t E_{x_t ~ q(.|x_0)} [ sum_i 1[x_t^i = mask] * (-alpha'(t) / (1 - alpha(t))) * (-log p_theta(x_0^i | x_t)) ]

(MDLM Eq. 10; LoopMDM applies it unchanged to the final loop's output, paper Sec. 3.)
SUBS parameterisation: the model never predicts the mask, and unmasked positions are
carried over, so they contribute exactly zero loss — we only score masked positions.
The reduction is MDLM's: the weighted sum over tokens divided by the number of non-pad tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loopmdm.diffusion.schedule import NoiseSchedule


def sample_times(batch: int, eps: float, antithetic: bool, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """t in [eps, 1], one per sequence. Antithetic = MDLM's stratified draw: t_i = (u_i + i) / n,
    which lowers the variance of the batch-mean loss."""
    u = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
    if antithetic:
        u = (u + torch.arange(batch, device=device, dtype=torch.float64)) / batch
    return ((1.0 - eps) * u + eps).float()


def forward_mask(x0: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule, mask_id: int,
                 generator: torch.Generator | None = None, valid: torch.Tensor | None = None,
                 maskable: torch.Tensor | None = None):
    """Draw x_t ~ q(x_t | x_0): each token is masked independently with prob 1 - alpha(t).
    Pads (valid = False) and given positions (maskable = False, e.g. a task's prompt) are
    never masked. Returns (x_t, masked)."""
    p_mask = schedule.mask_prob(t)[:, None]
    draws = torch.rand(x0.shape, generator=generator, device=x0.device)
    masked = draws < p_mask
    if valid is not None:
        masked &= valid
    if maskable is not None:
        masked &= maskable
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked


def maskable_after(prompt_len: int, x0: torch.Tensor, sep_id: int | None = None) -> torch.Tensor | None:
    """(B, L) True at the answer positions, which may be masked and are scored; None when
    nothing is given. Fixed-length prompts (tasks): positions >= prompt_len. Variable-length
    prompts (fine-tuning pairs, `sep_id` given): the positions after each row's first `sep_id`
    token -- the prompt and its separator stay given and attended, the answer and the EOS
    padding of its slot are trained on (SMDM / LLaDA SFT). A row without the separator has no
    answer positions."""
    if sep_id is not None:
        is_sep = x0 == sep_id
        L = x0.shape[1]
        first = torch.where(is_sep.any(1), is_sep.int().argmax(1), torch.full_like(x0[:, 0], L))
        return torch.arange(L, device=x0.device)[None, :] > first[:, None]
    if prompt_len <= 0:
        return None
    keep = torch.arange(x0.shape[1], device=x0.device) >= prompt_len
    return keep[None, :].expand(x0.shape[0], -1)


def weighted_token_nll(logits: torch.Tensor, x0: torch.Tensor, masked: torch.Tensor, t: torch.Tensor,
                       schedule: NoiseSchedule) -> torch.Tensor:
    """Per-token NELBO terms (B, L) in float32: weight(t) * -log p(x_0 | x_t) on masked positions,
    exactly 0 elsewhere."""
    B, L, V = logits.shape
    nll = F.cross_entropy(logits.float().reshape(B * L, V), x0.reshape(B * L), reduction="none").view(B, L)
    weight = schedule.loss_weight(t.float())[:, None]
    return torch.where(masked, weight * nll, torch.zeros_like(nll))


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar: weighted NLL sum / number of non-pad tokens
    nll_sum: torch.Tensor  # scalar, detached: the weighted NLL sum
    num_tokens: int  # non-pad tokens in the batch
    num_masked: torch.Tensor  # scalar tensor (no device sync in the training step)
    seq_nll: torch.Tensor | None = None  # (B,), detached: each sequence's weighted NLL sum
    seq_tokens: torch.Tensor | None = None  # (B,): each sequence's scored (non-pad) tokens
    t: torch.Tensor | None = None  # (B,): the noise levels drawn


def diffusion_loss(model, x0: torch.Tensor, schedule: NoiseSchedule, *, num_loops: int, eps: float,
                   antithetic: bool = True, generator: torch.Generator | None = None,
                   valid: torch.Tensor | None = None, t: torch.Tensor | None = None,
                   mask_id: int | None = None, maskable: torch.Tensor | None = None) -> LossOutput:
    """One Monte-Carlo estimate of the NELBO per token for a batch of clean sequences x0.
    `mask_id` defaults to `model.mask_id` (pass it when `model` is a DDP wrapper).
    `maskable` (B, L) marks the positions that may be masked and are scored; the loss is
    normalised by their number (SMDM/LLaDA's answer-length normalisation for prompted data)."""
    if t is None:
        t = sample_times(x0.shape[0], eps, antithetic, generator, x0.device)
    mask_id = model.mask_id if mask_id is None else mask_id
    x_t, masked = forward_mask(x0, t, schedule, mask_id, generator, valid, maskable)
    logits = model(x_t, num_loops=num_loops, t=t, key_mask=valid)
    terms = weighted_token_nll(logits, x0, masked, t, schedule)
    scored = valid if maskable is None else (maskable if valid is None else valid & maskable)
    num_tokens = int(scored.sum()) if scored is not None else x0.numel()
    nll_sum = terms.sum()
    seq_tokens = scored.sum(1) if scored is not None else torch.full((x0.shape[0],), x0.shape[1], device=x0.device)
    return LossOutput(loss=nll_sum / max(num_tokens, 1), nll_sum=nll_sum.detach(),
                      num_tokens=num_tokens, num_masked=masked.sum(), seq_nll=terms.detach().sum(1),
                      seq_tokens=seq_tokens, t=t)
