"""Adaptive halting rules: when may a denoiser call stop looping?

A rule turns two consecutive loop iterations into a per-position *score*; the loop stops
once the score falls below 1 (averaged over the call, per row, or per position: the
`Halting.granularity`). Each rule is a `HaltRule` spec registered in `HALT_RULES` below, so
`loopmdm sample --halt-rule NAME` and `sample-bench --rules` read the same table:

* ``change``        -- relative change of the hidden state, ||H^k - H^{k-1}|| / ||H^{k-1}||,
                       over all positions (the paper-reading rule `loopmdm analyze` reports).
                       Measured on our char-level runs it halts every call at the same loop:
                       the known positions dominate the mean and move alike in every call.
* ``change-masked`` -- the same relative change, averaged over the masked positions only
                       (the ones the call is asked to predict).
* ``change-scaled`` -- relative change of all positions against tau / m, m the row's masked
                       fraction (>= 1/L): calls with few masks left (late steps) halt sooner,
                       calls with many masks loop longer -- a threshold scaled by the noise level.
* ``flips``         -- change of the prediction: 1 where a masked position's top-1 token
                       differs from the previous iteration's, 0 elsewhere (mean = the flip
                       fraction). It halts at the first iteration that flips nothing, which
                       can come before the first flip (tests/test_halting.py's stub: 1 loop for
                       a crowded row, 2 for a nearly finished one) -- give it min_loops.
* ``kl``            -- change of the prediction: KL(p^k || p^{k-1}) in nats per masked position.

Rules that read the prediction (`needs_logits`) run the coda and head after every iteration
(and once on the starting state), which the runner adds to the call's FLOPs; the last probe
is the call's output, so it is not run twice.

A new rule is one function `signal(step: LoopStep) -> (change, counted)` and one registry line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from loopmdm.errors import require
from loopmdm.model.denoiser import relative_change

GRANULARITIES = ("call", "sequence", "token")


@dataclass
class LoopStep:
    """What a rule sees after loop iteration k."""

    h_prev: torch.Tensor  # (B, L, D) state before the iteration
    h_new: torch.Tensor  # (B, L, D) state after it
    masked: torch.Tensor  # (B, L) bool: the call's masked positions
    logp_prev: torch.Tensor | None = None  # (B, L, V) log-probabilities before (rules with needs_logits)
    logp_new: torch.Tensor | None = None  # (B, L, V) and after


@dataclass(frozen=True)
class HaltRule:
    name: str
    # signal(step) -> (change (B, L) float, counted (B, L) bool): the per-position change and
    # which positions the rule reads (the others follow their row).
    signal: Callable
    summary: str
    needs_logits: bool = False
    scale_by_masked: bool = False  # threshold tau / (masked fraction of the row)


def _all(step: LoopStep):
    return torch.ones_like(step.masked)


def _change(step: LoopStep):
    return relative_change(step.h_new, step.h_prev), _all(step)


def _change_masked(step: LoopStep):
    return relative_change(step.h_new, step.h_prev), step.masked


def _flips(step: LoopStep):
    flipped = step.logp_new.argmax(-1) != step.logp_prev.argmax(-1)
    return flipped.float(), step.masked


def _kl(step: LoopStep):
    p = step.logp_new.float()
    kl = (p.exp() * (p - step.logp_prev.float())).sum(-1).clamp_min(0.0)
    return kl, step.masked


HALT_RULES = {rule.name: rule for rule in (
    HaltRule("change", _change, "relative change of the hidden state, all positions"),
    HaltRule("change-masked", _change_masked, "relative change of the hidden state, masked positions"),
    HaltRule("change-scaled", _change, "relative change, all positions, threshold tau / masked fraction",
             scale_by_masked=True),
    HaltRule("flips", _flips, "fraction of masked positions whose top-1 prediction flipped", needs_logits=True),
    HaltRule("kl", _kl, "KL(p^k || p^(k-1)) per masked position, nats", needs_logits=True),
)}


@dataclass(frozen=True)
class Halting:
    """Stop looping once `rule`'s signal falls below `tau`, after at least `min_loops`
    iterations and at most `cap` (None: the loop schedule's count is the cap)."""

    tau: float
    min_loops: int = 1
    granularity: str = "call"
    rule: str = "change"
    cap: int | None = None

    def __post_init__(self):
        require(isinstance(self.tau, (int, float)) and not isinstance(self.tau, bool) and math.isfinite(self.tau)
                and self.tau > 0, f"halting tau={self.tau!r} must be a finite number > 0")
        require(isinstance(self.min_loops, int) and not isinstance(self.min_loops, bool) and self.min_loops >= 1,
                f"halting min_loops={self.min_loops!r} must be an integer >= 1")
        require(self.granularity in GRANULARITIES,
                f"halting granularity '{self.granularity}' is not allowed; choose one of: {', '.join(GRANULARITIES)}")
        require(self.rule in HALT_RULES,
                f"halting rule '{self.rule}' is not allowed; choose one of: {', '.join(HALT_RULES)}")
        require(self.cap is None or (isinstance(self.cap, int) and not isinstance(self.cap, bool)
                                     and self.cap >= self.min_loops),
                f"halting cap={self.cap!r} must be an integer >= min_loops ({self.min_loops})")

    @property
    def spec(self) -> HaltRule:
        return HALT_RULES[self.rule]

    def scores(self, step: LoopStep) -> tuple[torch.Tensor, torch.Tensor]:
        """(score (B, L), counted (B, L)): the rule's change over its threshold; < 1 = converged."""
        change, counted = self.spec.signal(step)
        tau = torch.full_like(change[:, :1], float(self.tau))
        if self.spec.scale_by_masked:
            L = step.masked.shape[1]
            tau = tau / step.masked.float().mean(1, keepdim=True).clamp_min(1.0 / L)
        return change.float() / tau, counted

    def still_active(self, step: LoopStep, active: torch.Tensor) -> torch.Tensor:
        """The positions that keep looping after this iteration, (B, L) bool."""
        score, counted = self.scores(step)
        weight = counted.float()
        if self.granularity == "call":
            total = weight.sum()
            mean = float((score * weight).sum() / total) if float(total) > 0 else 0.0
            return active if mean >= 1.0 else torch.zeros_like(active)
        row = (score * weight).sum(1, keepdim=True) / weight.sum(1, keepdim=True).clamp_min(1.0)  # (B, 1)
        if self.granularity == "sequence":
            return active & (row >= 1.0)
        # token: a counted position stops on its own score; the others loop while their row does.
        own = active & counted & (score >= 1.0)
        row_active = own.any(1, keepdim=True)
        return active & torch.where(counted, score >= 1.0, row_active)


def describe_rules() -> str:
    return "; ".join(f"{r.name}: {r.summary}" for r in HALT_RULES.values())
