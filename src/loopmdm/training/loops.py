"""The number of loop iterations S for a training step.

Paper Sec. 3: S ~ U{1, ..., S_max} per step. The draw is a pure function of (seed, step) —
Huginn's convention — so every data-parallel rank runs the same depth without
communicating, and a resumed run draws the same S as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np


def train_num_loops(step: int, seed: int, max_train_loops: int, loops_from_step: int = 0) -> int:
    """S for global step `step`, uniform on {1, ..., max_train_loops}; 1 before `loops_from_step`
    (the loop switched on partway through training, an option of ours)."""
    if step < loops_from_step:
        return 1
    rng = np.random.default_rng([seed, step, 0x100B])  # 0x100B: keeps this stream apart from others
    return int(rng.integers(1, max_train_loops + 1))
