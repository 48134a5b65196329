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
