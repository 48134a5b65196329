"""Synthetic depth-hungry tasks: generators and scorers only (decoding orders live in
`sampling/infill.py`). `TASKS` is the one registry of task names: config validation, the
data preparation and `loopmdm solve` all read it.

Every task is a fixed-length token sequence over a compact vocabulary (`symbols`, token
id = index); positions before `prompt_len` are always given (never masked, never scored).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from loopmdm.tasks import khop, sudoku


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    symbols: Callable[[int, int], list]  # (size, hops) -> token strings, id = index
    seq_len: Callable[[int, int], int]
    prompt_len: Callable[[int, int], int]
    examples: Callable[[int, int, int, int], np.ndarray]  # (size, hops, count, seed) -> (count, seq_len) ids
    check: Callable[[int, int], None]


def _check_sudoku(size: int, hops: int) -> None:
    sudoku.box_shape(size)


TASKS = {
    "sudoku": Task(
        name="sudoku",
        description="solved n x n Sudoku boards (size 4, 6 or 9), row-major; token id = digit - 1",
        symbols=lambda size, hops: [str(d) for d in range(1, size + 1)],
        seq_len=lambda size, hops: size * size,
        prompt_len=lambda size, hops: 0,
        examples=lambda size, hops, count, seed: sudoku.random_boards(size, count, seed) - 1,
        check=_check_sudoku,
    ),
    "khop": Task(
        name="khop",
        description="k-hop pointer chasing on a random cycle of `size` nodes (one token per edge), `hops` answer slots",
        symbols=lambda size, hops: khop.symbols(size),
        seq_len=khop.seq_len,
        prompt_len=lambda size, hops: khop.prompt_len(size),
        examples=khop.random_examples,
        check=khop.check,
    ),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        from loopmdm.errors import LoopMDMError

        raise LoopMDMError(f"task '{name}' is not allowed; choose one of: {', '.join(TASKS)}")
    return TASKS[name]
