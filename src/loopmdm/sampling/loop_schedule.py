"""How many loop iterations the denoiser runs at each sampling step.

A sampler asks its `LoopSchedule` once per denoiser call: `num_loops(step, num_steps, t)` for
denoising step `step` (0-based) of `num_steps`, at noise level `t` (1 = all masked, ~0 =
clean). Keeping this behind one small interface lets later work add adaptive or per-step
schedules (e.g. more loops at intermediate noise levels, where the paper finds the gains)
without touching the samplers.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

from loopmdm.errors import LoopMDMError, require


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class LoopSchedule(ABC):
    """Number of loop iterations per denoising step."""

    @abstractmethod
    def num_loops(self, step: int, num_steps: int, t: float) -> int:
        """Loop iterations for step `step` (0-based) of `num_steps` at noise level `t`."""


@dataclass(frozen=True)
class ConstantLoops(LoopSchedule):
    """The same number of loops at every step."""

    loops: int

    def __post_init__(self):
        require(_is_int(self.loops) and self.loops >= 1, f"loops must be an integer >= 1, got {self.loops!r}")

    def num_loops(self, step: int, num_steps: int, t: float) -> int:
        return self.loops


@dataclass(frozen=True)
class LinearLoops(LoopSchedule):
    """Loops interpolated linearly from `start` at the first step to `end` at the last,
    rounded half up. Steps outside [0, num_steps - 1] are clamped to the ends."""

    start: int
    end: int

    def __post_init__(self):
        for name in ("start", "end"):
            value = getattr(self, name)
            require(_is_int(value) and value >= 1, f"LinearLoops {name} must be an integer >= 1, got {value!r}")

    def num_loops(self, step: int, num_steps: int, t: float) -> int:
        if num_steps <= 1:
            return self.start
        frac = min(max(step / (num_steps - 1), 0.0), 1.0)
        return int(math.floor(self.start + (self.end - self.start) * frac + 0.5))


@dataclass(frozen=True)
class NoiseLoops(LoopSchedule):
    """More loops at intermediate noise: S(t) = low + (high - low) * 4 t (1 - t), rounded half
    up -- `high` at t = 1/2, `low` at t = 0 and 1 (the paper finds the loop's gain at
    intermediate noise levels; ours, a schedule over the trajectory S(t))."""

    low: int
    high: int

    def __post_init__(self):
        for name in ("low", "high"):
            value = getattr(self, name)
            require(_is_int(value) and value >= 1, f"NoiseLoops {name} must be an integer >= 1, got {value!r}")

    def num_loops(self, step: int, num_steps: int, t: float) -> int:
        bump = 4.0 * t * (1.0 - t)
        return int(math.floor(self.low + (self.high - self.low) * min(max(bump, 0.0), 1.0) + 0.5))


# One registry of schedule spellings (`loopmdm sample --loops`, `sample-bench`).
LOOP_SCHEDULES = {"linear": LinearLoops, "noise": NoiseLoops}


def parse_loop_schedule(text: str) -> LoopSchedule:
    """'8' -> ConstantLoops(8); 'linear:A:B' -> LinearLoops(A, B) over the steps;
    'noise:LOW:HIGH' -> NoiseLoops(LOW, HIGH) over t."""
    text = str(text).strip()
    spellings = "an integer >= 1, " + ", ".join(f"'{name}:A:B'" for name in LOOP_SCHEDULES)
    parts = text.split(":")
    try:
        if len(parts) == 1:
            return ConstantLoops(int(parts[0]))
        if len(parts) == 3 and parts[0] in LOOP_SCHEDULES:
            return LOOP_SCHEDULES[parts[0]](int(parts[1]), int(parts[2]))
    except ValueError:
        pass
    raise LoopMDMError(f"loop schedule '{text}' is not allowed; use {spellings}")


def describe(schedule: LoopSchedule) -> str:
    """The spelling `parse_loop_schedule` reads back."""
    if isinstance(schedule, ConstantLoops):
        return str(schedule.loops)
    for name, cls in LOOP_SCHEDULES.items():
        if isinstance(schedule, cls):
            a, b = (getattr(schedule, f) for f in cls.__dataclass_fields__)
            return f"{name}:{a}:{b}"
    return repr(schedule)


def as_loop_schedule(x: int | LoopSchedule) -> LoopSchedule:
    """An int means `ConstantLoops(x)`; a `LoopSchedule` (or any object with a callable
    `num_loops(step, num_steps, t)`) is returned unchanged."""
    if isinstance(x, LoopSchedule):
        return x
    if _is_int(x):
        return ConstantLoops(x)
    if callable(getattr(x, "num_loops", None)):
        return x  # duck-typed schedule
    raise LoopMDMError(f"loops must be an integer >= 1 or a LoopSchedule, got {x!r}")
