"""The samplers' denoiser for a trained model: how many loop iterations each call runs, and
what each call cost.

`LoopRunner(model)` has the samplers' signature `runner(x, num_loops, t) -> logits`; the loop
schedule (sampling/loop_schedule.py) gives `num_loops`, the most iterations a call may run.
On top of it, optionally:

* **Adaptive halting** (`Halting(tau, min_loops, granularity, rule)`, sampling/halting.py):
  after iteration k >= min_loops the loop stops once the rule's signal falls below tau -- by
  default the relative change of the hidden state, ||H^k - H^{k-1}|| / ||H^{k-1}|| per position
  (the quantity `loopmdm analyze` reports); `HALT_RULES` lists the others (masked positions
  only, a threshold scaled by the masked fraction, top-1 flips, KL of the prediction).
  Granularity:
  - ``call``     -- the mean over the batch's positions decides for the whole call (the
                    third-party reading of the paper: ~5 loops instead of 12 per step);
  - ``sequence`` -- each row stops on its own mean; halted rows keep their state;
  - ``token``    -- each position stops on its own change; converged positions keep their
                    state while the rest keep looping (still visible to attention as keys).
  `sequence` runs the loop block on the whole batch until every row has halted and discards
  the frozen updates. `token` runs it only on the positions still active
  (`LoopedDenoiser.loop_step_at`: gathered queries, MLP on active positions, keys and values
  of every position; frozen positions pass through every layer of the block unchanged --
  for a one-layer loop block exactly the dense semantics, for a deeper block their
  intermediate states are not recomputed), so it saves wall time too
  (benchmarks/token_halting.py); `skip_frozen=False` runs the dense block and discards the
  frozen updates. Both FLOP counts are recorded: `flops` (the dense loop) and `active_flops`
  (skipping frozen rows / positions; for tokens this counts their key/value projections as
  cached, which `loop_step_at` does not yet do).
* **Warm start** (ours, beyond the paper): a position whose token did not change since the
  previous call starts the loop from that call's final state H^S instead of the prelude
  output H^0, so the loop continues across denoising steps instead of restarting.

Every call is recorded (`records`: its loops, the diffusion time t, the masked fraction and the
denoising step it served, so loops per call can be plotted against t and step);
`stats(generated_tokens)` sums them up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loopmdm.devices import autocast_context
from loopmdm.model.flops import forward_flops, layer_flops, outside_flops
from loopmdm.sampling.halting import GRANULARITIES, HALT_RULES, Halting, LoopStep  # noqa: F401 (re-exported)

@dataclass
class CallRecord:
    loops: int  # iterations the call ran (its most active row / position)
    row_loops: list  # per row: iterations in which the row was updated (token halting: mean over positions)
    flops: float  # forward FLOPs computed for the batch
    active_flops: float  # forward FLOPs if halted rows / positions were skipped
    t: float = 1.0  # the call's diffusion time (mean over the batch)
    masked: float = 0.0  # fraction of the batch's positions that are masked
    step: int = 0  # denoising steps completed before the call (the sampler's step index)


@dataclass
class LoopRunner:
    model: torch.nn.Module
    halting: Halting | None = None
    warm_start: bool = False
    precision: str = "fp32"
    records: list = field(default_factory=list)
    step: int = 0  # the denoising step the next call serves (set by the caller, sampling/generate.py)
    skip_frozen: bool = True  # token halting: run the loop block on active positions only

    def __post_init__(self):
        self._prev_x, self._prev_h = None, None

    def reset(self) -> None:
        """Forget the recorded calls and the warm-start state (call between sampling runs)."""
        self.records, self._prev_x, self._prev_h, self.step = [], None, None, 0

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, num_loops: int, t: torch.Tensor) -> torch.Tensor:
        model = self.model
        B, L = x.shape
        masked = x == model.mask_id
        when = {"t": float(t.float().mean()) if t is not None else 1.0, "masked": float(masked.float().mean())}
        with autocast_context(x.device, self.precision):
            c = model.condition(t, B, x.device)
            h0 = model.run_prelude(x, c)
            if not model.is_looped:
                self._record(1, torch.ones(B), B, L, **when)
                return model.run_coda(h0, c).float()
            h_start = None
            if self.warm_start and self._prev_x is not None and self._prev_x.shape == x.shape:
                same = (x == self._prev_x)[..., None]
                h_start = torch.where(same, self._prev_h.to(h0.dtype), h0)
            halting = self.halting
            if halting is not None and halting.cap is not None:
                num_loops = min(num_loops, halting.cap)
            probe = halting is not None and halting.spec.needs_logits
            # Per position: still updated? and how many iterations it was updated in.
            active = torch.ones(B, L, dtype=torch.bool, device=x.device)
            token_loops = torch.zeros(B, L, device=x.device)
            logits = {"prev": None, "last": None}  # the prediction probes of rules that read it
            probes = 0

            def predict(h):
                nonlocal probes
                probes += 1
                out = model.run_coda(h, c).float()
                logits["last"] = (h, out)
                return torch.log_softmax(out, dim=-1)

            def merge(k, h_prev, h_new):
                nonlocal active
                token_loops.add_(active.float())
                h_new = torch.where(active[..., None], h_new, h_prev)
                step = LoopStep(h_prev, h_new, masked)
                if probe:
                    if logits["prev"] is None:
                        logits["prev"] = predict(h_prev)
                    step.logp_prev, step.logp_new = logits["prev"], predict(h_new)
                    logits["prev"] = step.logp_new
                if k >= halting.min_loops:
                    active = halting.still_active(step, active)
                return h_new

            def step_active(h, c, key_mask):
                # Per-token halting: run the loop block only on the positions still active.
                if bool(active.all()):
                    return model.loop_step(h, c, key_mask)
                return model.loop_step_at(h, c, active, key_mask)

            skip = self.skip_frozen and halting is not None and halting.granularity == "token" \
                and hasattr(model, "loop_step_at")
            # Without halting: no per-iteration bookkeeping and no device sync in the loop.
            h, k = h0, 0
            for h in model.iterate_loop(h0, c, None, num_loops, h_start=h_start,
                                        merge=merge if halting is not None else None,
                                        step=step_active if skip else None):
                k += 1
                if halting is not None and not bool(active.any()):
                    break
            if halting is None:
                token_loops.fill_(float(k))
            if logits["last"] is not None and logits["last"][0] is h:
                out = logits["last"][1]  # the last probe already ran the coda on the final state
                probes -= 1
            else:
                out = model.run_coda(h, c).float()
        if self.warm_start:
            self._prev_x, self._prev_h = x.clone(), h.detach()
        self._record(k, token_loops.mean(dim=1).cpu(), B, L, probes=probes, **when)
        return out

    def _record(self, loops: int, row_loops: torch.Tensor, B: int, L: int, t: float, masked: float,
                probes: int = 0) -> None:
        cfg = self.model.cfg
        per_loop = cfg.n_loop_layers * layer_flops(cfg, L)
        base = forward_flops(cfg, L, 1)
        # A prediction probe runs the coda and the head once more on the whole batch.
        probe = B * probes * (len(self.model.coda) * layer_flops(cfg, L) + outside_flops(cfg, L))
        active = float(sum(base + (float(r) - 1.0) * per_loop for r in row_loops)) + probe
        self.records.append(CallRecord(loops=loops, row_loops=[float(r) for r in row_loops],
                                       flops=B * forward_flops(cfg, L, loops) + probe, active_flops=active,
                                       t=t, masked=masked, step=self.step))

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
                "active_flops_per_token": active / per_token,
                # one entry per call, in call order: loops against t, masked fraction and step
                "call_loops": loops,
                "call_t": [round(r.t, 6) for r in self.records],
                "call_masked": [round(r.masked, 6) for r in self.records],
                "call_step": [r.step for r in self.records]}
