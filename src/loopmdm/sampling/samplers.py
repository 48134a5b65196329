"""Samplers for masked diffusion with a looped denoiser.

A denoiser is any callable `denoiser(x, num_loops, t) -> logits` with `x` a LongTensor (B, L)
whose masked positions hold `mask_id = V`, `t` a FloatTensor (B,), and logits (B, L, V) over
the V real tokens only (MDLM's SUBS parameterisation: the mask is never predicted and
unmasked tokens are carried over). A time-agnostic denoiser ignores `t`.

Samplers (MDLM's and LLaDA's conventions; docs/design.md):

* ``ancestral`` -- MDLM's "ddpm" update on the grid t_i = linspace(1, 1e-5, steps + 1). From t
  to s a masked token becomes v with probability (alpha(s) - alpha(t)) / (1 - alpha(t)) * p(v)
  and stays masked with probability (1 - alpha(s)) / (1 - alpha(t)). We draw this joint
  categorical in two equivalent stages, both from float64 uniforms of `generator`: first
  unmask-or-stay (one uniform per masked position), then the token by Gumbel-max over
  log p (only for the positions being unmasked, so memory does not scale with B*L*V at
  every step). Positions still masked after the last step get the argmax of a final call
  (MDLM's noise removal).
* ``cache`` -- MDLM's "ddpm_cache": the same draws, but when the previous step changed no
  token (and the loop count is unchanged) the previous logits are reused instead of calling
  the denoiser. Valid only for time-agnostic denoisers; returns exactly the tokens of
  ``ancestral`` for the same generator with at most as many calls.
* ``confidence`` -- LLaDA's low-confidence remasking: at step i commit the k_i most
  confident masked positions of each row, where the k_i split the row's initially-masked
  count as evenly as possible over the steps (earlier steps take the remainder).

Every sampler returns immediately (without calling the denoiser) once nothing is masked,
and skips calls that could not change anything (a confidence step with k_i = 0 in all rows).

Each sampler is a `Sampler` spec (its step loop and what it needs), registered by one line in
`loopmdm.names.SAMPLERS`; `sample()` dispatches through that registry. A new sampler is one
file defining `run(x, call, ts, steps, mask_id, temperature, generator, schedule)` and its
`Sampler(...)`, plus that line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from loopmdm.diffusion.schedule import NoiseSchedule
from loopmdm.errors import require
from loopmdm.names import SAMPLERS, lookup
from loopmdm.sampling.loop_schedule import LoopSchedule, as_loop_schedule

EPS_FINAL = 1e-5  # last point of the time grid (MDLM's sampling eps)


@dataclass(frozen=True)
class Sampler:
    name: str
    # run(x, call, ts, steps, mask_id, temperature, generator, schedule): unmask `x` in place, calling
    # the denoiser through `call` (a _Caller: `call(x, loops, t)`, `call.loops_at(i, t)`, `call.stepped(i, x)`)
    run: Callable
    needs_schedule: bool = True  # reads alpha(t) of the noise schedule
    time_agnostic_only: bool = False  # reuses predictions across time steps


@dataclass
class SampleResult:
    tokens: torch.Tensor  # LongTensor (B, L), every entry in [0, V)
    nfe: int  # number of denoiser calls
    loops_per_call: list[int] = field(default_factory=list)
    loop_passes: int = 0  # sum of loops over calls


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _uniform(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """float64 uniforms in (0, 1), drawn on the generator's device, returned on `device`."""
    gen_device = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float64)
    return u.to(device).clamp_(min=torch.finfo(torch.float64).tiny)


def _gumbel(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise -log(-log u) in float64 (lower precision truncates its tails,
    which silently lowers the temperature)."""
    return -torch.log(-torch.log(_uniform(shape, generator, device)))


def _pick_tokens(logits: torch.Tensor, temperature: float, generator, device) -> torch.Tensor:
    """Sample from softmax(logits / temperature) by Gumbel-max in float64 (argmax if T = 0).
    `logits` is (N, V)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    return (logp + _gumbel(logp.shape, generator, device)).argmax(dim=-1)


def num_transfer_tokens(masked_counts: torch.Tensor, steps: int) -> torch.Tensor:
    """(B,) masked counts -> (B, steps) tokens to commit per step, split as evenly as
    possible with the remainder going to the earliest steps (LLaDA's get_num_transfer_tokens)."""
    base = masked_counts // steps
    remainder = masked_counts % steps
    k = base[:, None].expand(-1, steps).clone()
    k += (torch.arange(steps, device=masked_counts.device)[None, :] < remainder[:, None]).long()
    return k


class _Caller:
    """Calls the denoiser, validates its output and records NFE and loop counts."""

    def __init__(self, denoiser, loops: LoopSchedule, steps: int, vocab: int):
        self.denoiser, self.loops, self.steps, self.vocab = denoiser, loops, steps, vocab
        self.loops_per_call: list[int] = []
        self.on_step = None

    def stepped(self, i: int, x: torch.Tensor) -> None:
        if self.on_step is not None:
            self.on_step(i, x)

    def loops_at(self, step: int, t: float) -> int:
        n = self.loops.num_loops(step, self.steps, t)
        require(_is_int(n) and n >= 1, f"loop schedule {self.loops!r} returned {n!r} loops at step {step}; need an integer >= 1")
        return n

    def __call__(self, x: torch.Tensor, num_loops: int, t: float) -> torch.Tensor:
        tt = torch.full((x.shape[0],), float(t), dtype=torch.float32, device=x.device)
        logits = self.denoiser(x, num_loops, tt)
        want = (*x.shape, self.vocab)
        require(tuple(logits.shape) == want, f"denoiser returned logits of shape {tuple(logits.shape)}, expected {want} (V = mask_id = {self.vocab})")
        self.loops_per_call.append(num_loops)
        return logits


@torch.no_grad()
def sample(
    denoiser,
    *,
    mask_id: int,
    seq_len: int | None = None,
    batch_size: int | None = None,
    x_init: torch.Tensor | None = None,
    steps: int,
    loops: int | LoopSchedule,
    sampler: str = "ancestral",
    schedule: NoiseSchedule | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    time_agnostic: bool = True,
    device: torch.device | str | None = None,
    on_step=None,
) -> SampleResult:
    """Generate the masked positions of `x_init` (or of an all-mask (batch_size, seq_len)
    sequence). Positions of `x_init` that are not `mask_id` are fixed and returned unchanged.
    `schedule` is required by samplers that read alpha(t) (`ancestral`, `cache`); `confidence` ignores it. `on_step(i, x)`,
    if given, sees the tokens after each denoising step i (read-only; `loopmdm sample --show`)."""
    require(sampler in SAMPLERS, f"unknown sampler '{sampler}'; choose one of: {', '.join(SAMPLERS)}")
    spec: Sampler = lookup(SAMPLERS, sampler, "sampler")
    require(_is_int(mask_id) and mask_id >= 1, f"mask_id must be an integer >= 1 (the vocabulary size V), got {mask_id!r}")
    require(_is_int(steps) and steps >= 1, f"steps must be an integer >= 1, got {steps!r}")
    require(
        isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and math.isfinite(temperature) and temperature >= 0,
        f"temperature must be a finite number >= 0, got {temperature!r}",
    )
    temperature = float(temperature)
    loop_schedule = as_loop_schedule(loops)
    if spec.needs_schedule:
        require(schedule is not None, f"sampler '{sampler}' needs a noise schedule (schedule=make_schedule(...))")
    require(
        not spec.time_agnostic_only or time_agnostic,
        f"sampler '{sampler}' reuses predictions across time steps and needs a time-agnostic denoiser (time_agnostic=True); use 'ancestral'",
    )

    if x_init is None:
        require(
            _is_int(seq_len) and seq_len >= 1 and _is_int(batch_size) and batch_size >= 1,
            f"without x_init, seq_len and batch_size must be integers >= 1, got seq_len={seq_len!r}, batch_size={batch_size!r}",
        )
        dev = torch.device(device) if device is not None else torch.device("cpu")
        x = torch.full((batch_size, seq_len), mask_id, dtype=torch.long, device=dev)
    else:
        require(isinstance(x_init, torch.Tensor), f"x_init must be a LongTensor (B, L), got {type(x_init).__name__}")
        require(x_init.dim() == 2 and x_init.numel() > 0, f"x_init must have shape (B, L) with B, L >= 1, got {tuple(x_init.shape)}")
        require(not x_init.is_floating_point() and not x_init.is_complex() and x_init.dtype != torch.bool, f"x_init must hold integer token ids, got dtype {x_init.dtype}")
        require(seq_len is None or seq_len == x_init.shape[1], f"seq_len={seq_len} does not match x_init's length {x_init.shape[1]}")
        require(batch_size is None or batch_size == x_init.shape[0], f"batch_size={batch_size} does not match x_init's batch {x_init.shape[0]}")
        lo, hi = int(x_init.min()), int(x_init.max())
        require(lo >= 0 and hi <= mask_id, f"x_init holds token id {lo if lo < 0 else hi} outside [0, {mask_id}] (mask_id = {mask_id})")
        dev = torch.device(device) if device is not None else x_init.device
        x = x_init.to(device=dev, dtype=torch.long, copy=True)

    call = _Caller(denoiser, loop_schedule, steps, mask_id)
    call.on_step = on_step
    ts = torch.linspace(1.0, EPS_FINAL, steps + 1, dtype=torch.float64)
    spec.run(x, call, ts, steps, mask_id, temperature, generator, schedule)
    if on_step is not None:
        on_step(steps, x)  # the final tokens (after noise removal)
    assert not (x == mask_id).any()
    return SampleResult(tokens=x, nfe=len(call.loops_per_call), loops_per_call=call.loops_per_call, loop_passes=sum(call.loops_per_call))


def _ancestral(x, call: _Caller, ts, steps, mask_id, temperature, generator, schedule: NoiseSchedule, use_cache: bool):
    alphas = schedule.alpha(ts).to(torch.float64)
    cached, cached_loops = None, None  # logits valid for the current x (cache sampler only)
    for i in range(steps):
        masked = x == mask_id
        if not masked.any():
            return
        t = float(ts[i])
        n_loops = call.loops_at(i, t)
        if cached is not None and cached_loops == n_loops:
            logits = cached
        else:
            logits = call(x, n_loops, t)
        a_t, a_s = alphas[i], alphas[i + 1]
        p_unmask = float(((a_s - a_t) / (1.0 - a_t)).clamp(0.0, 1.0))
        rows, cols = masked.nonzero(as_tuple=True)
        unmask = _uniform(rows.shape, generator, x.device) < p_unmask
        changed = bool(unmask.any())
        if changed:
            rows, cols = rows[unmask], cols[unmask]
            x[rows, cols] = _pick_tokens(logits[rows, cols], temperature, generator, x.device)
        cached, cached_loops = (logits, n_loops) if use_cache and not changed else (None, None)
        call.stepped(i, x)
    # Noise removal: whatever is still masked takes the argmax of a final prediction.
    masked = x == mask_id
    if masked.any():
        n_loops = call.loops_at(steps - 1, EPS_FINAL)
        logits = cached if cached is not None and cached_loops == n_loops else call(x, n_loops, EPS_FINAL)
        x[masked] = logits[masked].argmax(dim=-1)


def _confidence(x, call: _Caller, ts, steps, mask_id, temperature, generator, schedule=None):
    k = num_transfer_tokens((x == mask_id).sum(dim=1), steps)  # (B, steps)
    B, L = x.shape
    positions = torch.arange(L, device=x.device).expand(B, L)
    for i in range(steps):
        masked = x == mask_id
        if not masked.any():
            return
        k_i = k[:, i]
        if not (k_i > 0).any():
            continue
        t = float(ts[i])
        logits = call(x, call.loops_at(i, t), t)
        logp = torch.log_softmax(logits[masked].double(), dim=-1)  # (n_masked, V)
        cand = _pick_tokens(logp, temperature, generator, x.device)
        conf = torch.full((B, L), -math.inf, dtype=torch.float64, device=x.device)
        conf[masked] = logp.gather(-1, cand[:, None]).squeeze(-1).exp()
        proposal = x.clone()
        proposal[masked] = cand
        order = conf.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, positions)
        commit = masked & (rank < k_i[:, None])
        x[commit] = proposal[commit]
        call.stepped(i, x)


ANCESTRAL = Sampler("ancestral", lambda *a: _ancestral(*a, use_cache=False))
CACHE = Sampler("cache", lambda *a: _ancestral(*a, use_cache=True), time_agnostic_only=True)
CONFIDENCE = Sampler("confidence", _confidence, needs_schedule=False)


def decode_samples(tokenizer, tokens: torch.Tensor, mask_id: int) -> list[str]:
    """Decode each row of `tokens` with `tokenizer.decode(ids, mask_id=mask_id)`."""
    rows = tokens.tolist() if isinstance(tokens, torch.Tensor) else [list(r) for r in tokens]
    return [tokenizer.decode(ids, mask_id=mask_id) for ids in rows]
