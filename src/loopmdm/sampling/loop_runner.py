"""The samplers' denoiser for a trained model: how many loop iterations each call runs, and
what each call cost.

`LoopRunner(model)` has the samplers' signature `runner(x, num_loops, t) -> logits`; the loop
schedule (sampling/loop_schedule.py) gives `num_loops`, the most iterations a call may run.
On top of it, optionally:

* **Adaptive halting** (`Halting(tau, min_loops, granularity)`): after iteration k >= min_loops
  the loop stops once the relative change of the hidden state, ||H^k - H^{k-1}|| / ||H^{k-1}||
  per position (norm over the hidden dimension; the same quantity `loopmdm analyze` reports),
  falls below tau. Granularity:
  - ``call``     -- the mean over the batch's positions decides for the whole call (the
                    third-party reading of the paper: ~5 loops instead of 12 per step);
  - ``sequence`` -- each row stops on its own mean; halted rows keep their state;
  - ``token``    -- each position stops on its own change; converged positions keep their
                    state while the rest keep looping (still visible to attention as keys).
  `sequence` and `token` run the loop block on the whole batch until every row / position has
  halted and discard the frozen updates, so on dense hardware they save wall time only when
  the whole batch halts early. Both FLOP counts are recorded: `flops` (what ran) and
  `active_flops` (what an implementation that skips frozen rows / positions would run; for
  tokens this assumes the frozen positions' keys and values are cached, as their state no
  longer changes).
* **Warm start** (ours, beyond the paper): a position whose token did not change since the
  previous call starts the loop from that call's final state H^S instead of the prelude
  output H^0, so the loop continues across denoising steps instead of restarting.

Every call is recorded (`records`); `stats(generated_tokens)` sums them up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from loopmdm.devices import autocast_context
from loopmdm.errors import require
from loopmdm.model.denoiser import relative_change
from loopmdm.model.flops import forward_flops, layer_flops

GRANULARITIES = ("call", "sequence", "token")


@dataclass(frozen=True)
class Halting:
    """Stop looping once the relative change of the hidden state falls below `tau`."""

    tau: float
    min_loops: int = 1
    granularity: str = "call"

    def __post_init__(self):
        require(isinstance(self.tau, (int, float)) and not isinstance(self.tau, bool) and math.isfinite(self.tau)
                and self.tau > 0, f"halting tau={self.tau!r} must be a finite number > 0")
        require(isinstance(self.min_loops, int) and not isinstance(self.min_loops, bool) and self.min_loops >= 1,
                f"halting min_loops={self.min_loops!r} must be an integer >= 1")
        require(self.granularity in GRANULARITIES,
                f"halting granularity '{self.granularity}' is not allowed; choose one of: {', '.join(GRANULARITIES)}")


@dataclass
class CallRecord:
    loops: int  # iterations the call ran (its most active row / position)
    row_loops: list  # per row: iterations in which the row was updated (token halting: mean over positions)
    flops: float  # forward FLOPs computed for the batch
    active_flops: float  # forward FLOPs if halted rows / positions were skipped


@dataclass
class LoopRunner:
    model: torch.nn.Module
    halting: Halting | None = None
    warm_start: bool = False
    precision: str = "fp32"
    records: list = field(default_factory=list)

    def __post_init__(self):
        self._prev_x, self._prev_h = None, None

    def reset(self) -> None:
        """Forget the recorded calls and the warm-start state (call between sampling runs)."""
        self.records, self._prev_x, self._prev_h = [], None, None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, num_loops: int, t: torch.Tensor) -> torch.Tensor:
        model = self.model
        B, L = x.shape
        with autocast_context(x.device, self.precision):
            c = model.condition(t, B, x.device)
            h0 = model.run_prelude(x, c)
            if not model.is_looped:
                self._record(1, torch.ones(B), B, L)
                return model.run_coda(h0, c).float()
            h_start = None
            if self.warm_start and self._prev_x is not None and self._prev_x.shape == x.shape:
                same = (x == self._prev_x)[..., None]
                h_start = torch.where(same, self._prev_h.to(h0.dtype), h0)
            halting = self.halting
            # Per position: still updated? and how many iterations it was updated in.
            active = torch.ones(B, L, dtype=torch.bool, device=x.device)
            token_loops = torch.zeros(B, L, device=x.device)

            def merge(k, h_prev, h_new):
                nonlocal active
                token_loops.add_(active.float())
                change = relative_change(h_new, h_prev)  # (B, L)
                h_new = torch.where(active[..., None], h_new, h_prev)
                if k >= halting.min_loops:
                    if halting.granularity == "call":
                        if float(change.mean()) < halting.tau:
                            active = torch.zeros_like(active)
                    elif halting.granularity == "sequence":
                        active = active & (change.mean(dim=1, keepdim=True) >= halting.tau)
                    else:
                        active = active & (change >= halting.tau)
                return h_new

            # Without halting: no per-iteration bookkeeping and no device sync in the loop.
            h, k = h0, 0
            for h in model.iterate_loop(h0, c, None, num_loops, h_start=h_start,
                                        merge=merge if halting is not None else None):
                k += 1
                if halting is not None and not bool(active.any()):
                    break
            if halting is None:
                token_loops.fill_(float(k))
            logits = model.run_coda(h, c).float()
        if self.warm_start:
            self._prev_x, self._prev_h = x.clone(), h.detach()
        self._record(k, token_loops.mean(dim=1).cpu(), B, L)
        return logits

    def _record(self, loops: int, row_loops: torch.Tensor, B: int, L: int) -> None:
        cfg = self.model.cfg
        per_loop = cfg.n_loop_layers * layer_flops(cfg, L)
        base = forward_flops(cfg, L, 1)
        active = float(sum(base + (float(r) - 1.0) * per_loop for r in row_loops))
        self.records.append(CallRecord(loops=loops, row_loops=[float(r) for r in row_loops],
                                       flops=B * forward_flops(cfg, L, loops), active_flops=active))

    def stats(self, generated_tokens: int) -> dict:
        """Compute accounting of the recorded calls: denoiser calls, loop iterations per call
        (mean and histogram over calls), mean loops per row, FLOPs per generated token."""
        calls = len(self.records)
        loops = [r.loops for r in self.records]
        rows = [x for r in self.records for x in r.row_loops]
        hist: dict[int, int] = {}
        for n in loops:
            hist[n] = hist.get(n, 0) + 1
        flops = sum(r.flops for r in self.records)
        active = sum(r.active_flops for r in self.records)
        per_token = max(generated_tokens, 1)
        return {"calls": calls,
                "loop_passes": sum(loops),
                "loops_mean": sum(loops) / calls if calls else 0.0,
                "loops_hist": dict(sorted(hist.items())),
                "row_loops_mean": sum(rows) / len(rows) if rows else 0.0,
                "flops_per_token": flops / per_token,
                "active_flops_per_token": active / per_token}
