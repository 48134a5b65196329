"""Task accuracy against the number of loops (`loopmdm solve`): Sudoku solve rate and cell
accuracy by difficulty, k-hop accuracy per hop, exact match of prompt/answer pairs.

Test examples come from the run's validation split, or its test split where the task has one
(data.test_fraction > 0), which hold no training example (data/prepare.py drops duplicates); how each task blanks and scores them is its own
(`tasks.Scoring`: tasks/sudoku.py, tasks/khop.py, tasks/pairs.py). Everything is seeded,
so arms and loop counts see the same examples.
"""

from __future__ import annotations

import numpy as np
import torch

from loopmdm.data.loader import eval_rows
from loopmdm.devices import autocast_context
from loopmdm.errors import require
from loopmdm.sampling.infill import fill_blanks
from loopmdm.tasks import Scoring, get_task
from loopmdm.tasks.pairs import PAIRS, blank_answer


def scoring_of(task: str) -> Scoring:
    """The scoring spec of a task name, or of "pairs"."""
    return PAIRS if task == "pairs" else get_task(task).scoring


def task_test_set(data, num: int, seed: int = 0, answer_len: int = 0, split: str = "val") -> dict:
    """{"x": masked inputs (N, L), "target": clean rows, "difficulty": per-example int or -1, ...},
    from `split` ("test" where the task was prepared with data.test_fraction > 0: the split no
    choice has seen)."""
    from loopmdm.names import TASKS

    task = "pairs" if data.prompt_sep_id is not None else data.meta.get("task")
    require(task == "pairs" or task in TASKS, f"prepared data '{data.path}' is not a task dataset (meta task={task!r}); "
                                              "`loopmdm solve` needs a run trained with data.source=task or pairs")
    val = np.asarray(data.blocks(split)).astype(np.int64)
    picked = eval_rows(len(val), num, 1) if num < len(val) else np.arange(len(val))
    return scoring_of(task).test_set(data, val[picked], picked, seed, answer_len)


def pairs_test_set(tokenizer, pairs: list, seq_len: int, mask_id: int, num: int = 0, answer_len: int = 0) -> dict:
    """A test set from external prompt/answer pairs (e.g. the GSM8K test set), laid out as
    fine-tuning rows ([prompt][EOS][answer][EOS...]) with the answer slot blank. Pairs that do
    not fit `seq_len` are left out and counted (`skipped`)."""
    eos = tokenizer.eos_id
    rows, difficulty, skipped = [], [], 0
    for prompt, answer, d in pairs[:num or None]:
        p_ids, a_ids = tokenizer.encode(prompt), tokenizer.encode(answer)
        if len(p_ids) + len(a_ids) + 2 > seq_len or eos in p_ids:
            skipped += 1
            continue
        rows.append(p_ids + [eos] + a_ids + [eos] * (seq_len - len(p_ids) - len(a_ids) - 1))
        difficulty.append(d)
    require(rows, f"none of the {len(pairs[:num or None])} pairs fits the run's length {seq_len} "
                  "(prompt + answer + 2 EOS); fine-tune with a larger data.seq_len")
    rows = np.asarray(rows, dtype=np.int64)
    return {"task": "pairs", "x": blank_answer(rows, eos, mask_id, answer_len), "target": rows,
            "difficulty": np.asarray(difficulty), "eos_id": eos, "skipped": skipped}


def _denoiser(model, device, precision):
    def call(x, num_loops, t):
        with autocast_context(device, precision):
            return model(x, num_loops=num_loops, t=t)
    return call


def score(test: dict, filled: np.ndarray, mask_id: int) -> dict:
    return scoring_of(test["task"]).score(test, filled, mask_id)


@torch.no_grad()
def solve_task(model, data, test: dict, loops: list[int], order: str, device, precision: str = "fp32",
               batch_size: int = 256, block_len: int = 0) -> list[dict]:
    """One record per loop count: accuracy under `order` on `test` (from task_test_set)."""
    model.eval()
    num_symbols = scoring_of(test["task"]).answer_symbols(data.meta)
    mask_id = data.vocab_size
    call = _denoiser(model, device, precision)
    results = []
    for num_loops in loops:
        filled, nfe = [], 0
        for start in range(0, len(test["x"]), batch_size):
            x = torch.as_tensor(test["x"][start:start + batch_size], device=device)
            out = fill_blanks(call, x, mask_id, order, num_loops if model.is_looped else 1, num_symbols, block_len)
            filled.append(out.tokens.cpu().numpy())
            nfe += out.nfe
        record = {"loops": num_loops, "order": order, "nfe": nfe, **({"block_len": block_len} if block_len else {})}
        record.update(score(test, np.concatenate(filled), mask_id))
        results.append(record)
    return results
