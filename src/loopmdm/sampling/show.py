"""`loopmdm sample --show`: watch the unmasking step by step in the terminal.

Each frame is the first sample after one denoising step: masked positions as `_`, tokens
committed at this step highlighted (bold inverse on a terminal, [brackets] otherwise), and a
header with the step, the noise level left (fraction still masked) and the loop iterations
the step's denoiser call spent. On a terminal the frames replace each other; piped, they
are printed one after another (only steps that changed something).
"""

from __future__ import annotations

import sys
import time

import torch

NEW_ON, NEW_OFF = "\x1b[1;7m", "\x1b[0m"
CLEAR = "\x1b[H\x1b[2J"


def render(tokenizer, prev: list[int], cur: list[int], mask_id: int, color: bool) -> str:
    """The text of `cur` with masks as `_` and the tokens that were masked in `prev` highlighted."""
    pieces, run, kind = [], [], None

    def flush():
        if not run:
            return
        if kind == "mask":
            pieces.append("_" * len(run))
            return
        text = tokenizer.decode(run)
        if kind == "new":
            text = f"{NEW_ON}{text}{NEW_OFF}" if color else f"[{text}]"
        pieces.append(text)

    for p, c in zip(prev, cur):
        k = "mask" if c == mask_id else ("new" if p == mask_id else "old")
        if k != kind:
            flush()
            run, kind = [], k
        run.append(c)
    flush()
    return "".join(pieces)


class StepViewer:
    """An `on_step` / `on_call` pair for `generate()` that prints frames of row 0."""

    def __init__(self, tokenizer, mask_id: int, steps: int, out=None, delay: float = 0.05):
        self.tokenizer, self.mask_id, self.steps = tokenizer, mask_id, steps
        self.out = out or sys.stdout
        self.color = hasattr(self.out, "isatty") and self.out.isatty()
        self.delay = delay if self.color else 0.0
        self.prev: list[int] | None = None
        self.loops_since_step = 0
        self.total = None

    def on_call(self, record) -> None:
        self.loops_since_step += record.loops

    def on_step(self, i: int, x: torch.Tensor) -> None:
        cur = x[0].tolist()
        if self.prev is None:
            self.prev = [self.mask_id] * len(cur)
            self.total = max(sum(1 for c in self.prev if c == self.mask_id), 1)
        if cur == self.prev and i < self.steps:
            self.loops_since_step = 0
            return
        left = sum(1 for c in cur if c == self.mask_id) / self.total
        label = "final" if i >= self.steps else f"step {i + 1}/{self.steps}"
        frame = (f"{label}  masked {left:5.1%}  loops this step: {self.loops_since_step}\n"
                 f"{render(self.tokenizer, self.prev, cur, self.mask_id, self.color)}\n")
        self.out.write((CLEAR if self.color else "") + frame + ("" if self.color else "\n"))
        self.out.flush()
        if self.delay:
            time.sleep(self.delay)
        self.prev, self.loops_since_step = cur, 0
