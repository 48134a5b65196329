"""Synthetic depth-hungry tasks and the scoring of answers: what a task is, as one spec.

A `Task` (one per file: tasks/sudoku.py, tasks/khop.py) owns everything about it: the
generator and its vocabulary (data preparation), and a `Scoring` -- the test set drawn from
the validation split, the scorer, the line `loopmdm solve` prints per loop count and the
tables a suite report draws. Fine-tuning pairs (`data.source=pairs`) are scored the same way
(tasks/pairs.py `PAIRS`). Names are registered in `loopmdm.names.TASKS`; decoding orders live
in `sampling/infill.py`, the loop over S in `evaluation/solve.py`.

Adding a task: a file here defining `TASK = Task(...)`, and one line in names.TASKS.

Every task is a fixed-length token sequence over a compact vocabulary (`symbols`, token
id = index); positions before `prompt_len` are always given (never masked, never scored).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class PerS:
    """A report table of one number per record, by arm and S (`{order}_{key}` in summary.json)."""

    key: str
    title: str
    value: Callable[[dict], float]


@dataclass(frozen=True)
class ByDifficulty:
    """A report table of `key` (a rate in each record's `by_difficulty`) per difficulty column."""

    key: str
    title: str
    note: str


@dataclass(frozen=True)
class Scoring:
    # (data, rows, picked, seed, answer_len) -> {"task", "x" (blanked), "target", "difficulty", ...}:
    # `rows` are the validation rows `picked` (indices) from PreparedData `data`.
    test_set: Callable
    score: Callable[[dict, np.ndarray, int], dict]  # (test, filled, mask_id) -> metrics
    describe: Callable[[dict], str]  # a record -> the line `loopmdm solve` prints after "S=..."
    headline: tuple[str, str]  # (record key, title) of the report's first table per order
    tables: Callable[[dict], tuple] = lambda record: ()  # a record -> further report tables (PerS, ByDifficulty)
    answer_symbols: Callable[[dict], int | None] = lambda meta: None  # candidate ids [0, n) when filling blanks


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    symbols: Callable[[int, int], list]  # (size, hops) -> token strings, id = index
    seq_len: Callable[[int, int], int]
    prompt_len: Callable[[int, int], int]
    examples: Callable[[int, int, int, int], np.ndarray]  # (size, hops, count, seed) -> (count, seq_len) ids
    check: Callable[[int, int], None]
    scoring: Scoring
    # (rows (B, L) ids, size, rng) -> rows: random symmetries that keep an example valid, applied
    # to training batches with data.task_augment (None: the task has none).
    augment: Callable | None = None


def get_task(name: str) -> Task:
    from loopmdm.names import TASKS, lookup

    return lookup(TASKS, name, "task")

