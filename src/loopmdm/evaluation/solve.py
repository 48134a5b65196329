"""Task accuracy against the number of loops: Sudoku solve rate and cell accuracy by
difficulty, k-hop accuracy per hop (`loopmdm solve`).

Test examples come from the run's validation split, which holds no training example
(data/prepare.py drops duplicates): Sudoku puzzles are made from validation boards by
blanking cells while the solution stays unique; k-hop answers are the validation rows'
answer slots. Everything is seeded, so arms and loop counts see the same examples.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from loopmdm.data.loader import eval_rows
from loopmdm.devices import autocast_context
from loopmdm.diffusion.objective import maskable_after
from loopmdm.errors import require
from loopmdm.sampling.infill import fill_blanks
from loopmdm.tasks import sudoku

# Sudoku: blanks per puzzle drawn uniformly from this range (make_puzzle stops earlier when
# no further cell can be blanked with a unique solution).
SUDOKU_BLANKS = {4: (6, 12), 6: (14, 26), 9: (40, 58)}


def _blank_answer(rows: np.ndarray, sep_id: int, mask_id: int, answer_len: int = 0) -> np.ndarray:
    """Blank the answer slot (after the first separator). With `answer_len` K only its first K
    positions are blank and the rest is given as EOS padding: the answer length as an option
    (LLaDA's generation length), K calls instead of the whole slot under one-at-a-time orders."""
    answer = maskable_after(0, torch.as_tensor(rows), sep_id).numpy()
    x = np.where(answer, mask_id, rows)
    if answer_len > 0:
        start = answer.argmax(1)[:, None]
        beyond = answer & (np.arange(rows.shape[1])[None, :] >= start + answer_len)
        x = np.where(beyond, sep_id, x)
    return x


def task_test_set(data, num: int, seed: int = 0, answer_len: int = 0) -> dict:
    """{"x": masked inputs (N, L), "target": clean rows, "difficulty": per-example int or -1}."""
    task = "pairs" if data.prompt_sep_id is not None else data.meta.get("task")
    require(task in ("sudoku", "khop", "pairs"), f"prepared data '{data.path}' is not a task dataset (meta task={task!r}); "
                                                  "`loopmdm solve` needs a run trained with data.source=task or pairs")
    val = np.asarray(data.blocks("val")).astype(np.int64)
    picked = eval_rows(len(val), num, 1) if num < len(val) else np.arange(len(val))
    rows = val[picked]
    mask_id = data.vocab_size
    if task == "pairs":  # the answer slot (after the first EOS) is blank; exact match of the answer
        return {"task": task, "x": _blank_answer(rows, data.prompt_sep_id, mask_id, answer_len), "target": rows,
                "difficulty": data.difficulty("val")[picked], "eos_id": data.eos_id}
    if task == "khop":
        x = rows.copy()
        x[:, int(data.meta["answer_start"]):] = mask_id
        return {"task": task, "x": x, "target": rows, "difficulty": np.full(len(rows), -1)}
    n = int(data.meta["task_size"])
    lo, hi = SUDOKU_BLANKS[n]
    rng = np.random.default_rng(seed)
    puzzles, difficulty = [], []
    for board in rows + 1:  # digits 1..n
        puzzle = sudoku.make_puzzle(board, n, int(rng.integers(lo, hi + 1)), rng)
        puzzles.append(puzzle)
        rounds = sudoku.deduction_rounds(puzzle, n)
        difficulty.append(-1 if rounds is None else rounds)
    puzzles = np.stack(puzzles)
    x = np.where(puzzles == 0, mask_id, puzzles - 1)
    return {"task": task, "x": x, "target": rows, "difficulty": np.array(difficulty), "size": n}


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
    return {"task": "pairs", "x": _blank_answer(rows, eos, mask_id, answer_len), "target": rows,
            "difficulty": np.asarray(difficulty), "eos_id": eos, "skipped": skipped}


def _denoiser(model, device, precision):
    def call(x, num_loops, t):
        with autocast_context(device, precision):
            return model(x, num_loops=num_loops, t=t)
    return call


def score(test: dict, filled: np.ndarray, mask_id: int) -> dict:
    x, target = test["x"], test["target"]
    blank = x == mask_id
    correct = (filled == target) & blank
    if test["task"] == "pairs":
        def answer(row, b):  # the tokens of the answer slot up to its first EOS
            ids = list(row[b])
            return ids[:ids.index(test["eos_id"])] if test["eos_id"] in ids else ids
        slot = maskable_after(0, torch.as_tensor(target), test["eos_id"]).numpy()  # blank + given EOS padding
        exact = np.array([answer(f, s) == answer(t, s) for f, t, s in zip(filled, target, slot)])
        by_diff = {}
        for d in sorted(set(int(v) for v in test["difficulty"])):
            pick = test["difficulty"] == d
            by_diff["?" if d < 0 else str(d)] = {"n": int(pick.sum()), "exact": float(exact[pick].mean())}
        return {"exact": float(exact.mean()), "token_acc": float(correct.sum() / max(blank.sum(), 1)), "n": len(x),
                "by_difficulty": by_diff}
    if test["task"] == "khop":
        per_hop = correct[:, blank[0]].mean(0)
        return {"acc": float(correct.sum() / blank.sum()), "per_hop": [float(a) for a in per_hop],
                "all_hops": float(correct[:, blank[0]].all(1).mean()), "n": len(x)}
    n = test["size"]
    solved = np.array([sudoku.solves(f + 1, np.where(b, 0, xi + 1), n) for f, b, xi in zip(filled, blank, x)])
    cell_acc = correct.sum(1) / blank.sum(1).clip(min=1)
    by_diff = defaultdict(lambda: {"n": 0, "solved": 0.0, "cell_acc": 0.0})
    for d, s, c in zip(test["difficulty"], solved, cell_acc):
        entry = by_diff["guess" if d < 0 else str(int(d))]
        entry["n"] += 1
        entry["solved"] += float(s)
        entry["cell_acc"] += float(c)
    for entry in by_diff.values():
        entry["solved"] /= entry["n"]
        entry["cell_acc"] /= entry["n"]
    return {"solved": float(solved.mean()), "cell_acc": float(cell_acc.mean()), "n": len(x),
            "by_difficulty": dict(sorted(by_diff.items(), key=lambda kv: (kv[0] == "guess", kv[0].zfill(3))))}


@torch.no_grad()
def solve_task(model, data, test: dict, loops: list[int], order: str, device, precision: str = "fp32",
               batch_size: int = 256, block_len: int = 0) -> list[dict]:
    """One record per loop count: accuracy under `order` on `test` (from task_test_set)."""
    model.eval()
    num_symbols = None if test["task"] == "pairs" else int(data.meta["task_size"])
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
