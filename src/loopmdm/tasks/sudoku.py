"""Sudoku boards and puzzles, generated offline and seeded (a depth-hungry task, paper Sec. 5).

A board of side n (4, 6 or 9; boxes 2x2, 2x3, 3x3) is a row-major sequence of n*n digits,
token id = digit - 1. Training sequences are solved boards (MDLM's objective on the whole
board); a puzzle is a solved board with blanks whose solution is unique, and its
*difficulty* is the number of parallel rounds of naked/hidden-single deduction needed to
solve it (None when singles alone get stuck and guessing is needed). Under a restricted
decoding order (raster, one-shot) those rounds must happen inside one denoiser call,
which is where the loop's extra depth should pay (docs/design.md, "Depth-hungry tasks").

Solutions are drawn by a randomised backtracking filler, then re-randomised with the
validity-preserving symmetries (digit relabelling, row/column permutations within bands
and stacks, band and stack permutations, transposition for square boxes).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from loopmdm.errors import require
from loopmdm.tasks import ByDifficulty, PerS, Scoring, Task

BOX_SHAPES = {4: (2, 2), 6: (2, 3), 9: (3, 3)}
# Puzzles (`loopmdm solve`, `loopmdm pairs sudoku:N`): blanks per puzzle drawn uniformly from this
# range (make_puzzle stops earlier when no further cell can be blanked with a unique solution).
PUZZLE_BLANKS = {4: (6, 12), 6: (14, 26), 9: (40, 58)}


def box_shape(n: int) -> tuple[int, int]:
    require(n in BOX_SHAPES, f"sudoku size {n} is not allowed; choose one of: {', '.join(map(str, BOX_SHAPES))}")
    return BOX_SHAPES[n]


def _units(n: int) -> list[np.ndarray]:
    """Flat cell indices of every row, column and box."""
    br, bc = box_shape(n)
    idx = np.arange(n * n).reshape(n, n)
    units = [idx[r] for r in range(n)] + [idx[:, c] for c in range(n)]
    for r0 in range(0, n, br):
        for c0 in range(0, n, bc):
            units.append(idx[r0:r0 + br, c0:c0 + bc].reshape(-1))
    return units


_PEERS: dict[int, list[list[int]]] = {}
_UNITS: dict[int, list[np.ndarray]] = {}


def peers(n: int) -> list[list[int]]:
    """For each cell, the other cells that share its row, column or box."""
    if n not in _PEERS:
        units = _units(n)
        _UNITS[n] = units
        _PEERS[n] = [sorted({int(j) for u in units if i in u for j in u} - {i}) for i in range(n * n)]
    return _PEERS[n]


def units(n: int) -> list[np.ndarray]:
    peers(n)
    return _UNITS[n]


def _candidates(grid: list[int], n: int, cell: int) -> list[int]:
    used = {grid[j] for j in peers(n)[cell]}
    return [d for d in range(1, n + 1) if d not in used]


def count_solutions(puzzle: np.ndarray, n: int, limit: int = 2) -> int:
    """Number of completions of `puzzle` (0 = blank), counting up to `limit` (MRV backtracking)."""
    grid = [int(v) for v in np.asarray(puzzle).reshape(-1)]
    found = 0

    def solve() -> bool:
        nonlocal found
        best, best_cands = -1, None
        for cell in range(n * n):
            if grid[cell] == 0:
                cands = _candidates(grid, n, cell)
                if best_cands is None or len(cands) < len(best_cands):
                    best, best_cands = cell, cands
                    if len(cands) <= 1:
                        break
        if best < 0:
            found += 1
            return found >= limit
        for d in best_cands:
            grid[best] = d
            if solve():
                return True
        grid[best] = 0
        return False

    solve()
    return found


def random_filled_board(n: int, rng: np.random.Generator) -> np.ndarray:
    """One solved board from a randomised backtracking filler."""
    grid = [0] * (n * n)

    def fill(cell: int) -> bool:
        if cell == n * n:
            return True
        for d in rng.permutation(n) + 1:
            if int(d) in {grid[j] for j in peers(n)[cell]}:
                continue
            grid[cell] = int(d)
            if fill(cell + 1):
                return True
        grid[cell] = 0
        return False

    fill(0)
    return np.array(grid, dtype=np.int64).reshape(n, n)


def shuffle_boards(boards: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Apply independent random validity-preserving symmetries to each board (B, n, n)."""
    B, n, _ = boards.shape
    br, bc = box_shape(n)

    def line_perm(group: int) -> np.ndarray:
        # permute groups (bands/stacks), then lines within each group: one (B, n) index array
        n_groups = n // group
        order = np.argsort(rng.random((B, n_groups)), axis=1)
        within = np.argsort(rng.random((B, n_groups, group)), axis=2)
        return (order[:, :, None] * group + within).reshape(B, n)

    rows, cols = line_perm(br), line_perm(bc)
    out = boards[np.arange(B)[:, None, None], rows[:, :, None], cols[:, None, :]]
    relabel = np.argsort(rng.random((B, n)), axis=1) + 1  # digit d -> relabel[d - 1]
    out = np.take_along_axis(relabel, (out - 1).reshape(B, -1), axis=1).reshape(B, n, n)
    if br == bc:
        flip = rng.random(B) < 0.5
        out[flip] = out[flip].transpose(0, 2, 1)
    return out


def random_boards(n: int, count: int, seed: int, n_base: int = 64) -> np.ndarray:
    """`count` solved boards (count, n*n) of digits 1..n."""
    rng = np.random.default_rng(seed)
    base = np.stack([random_filled_board(n, rng) for _ in range(min(n_base, count))])
    picks = base[rng.integers(0, len(base), count)]
    return shuffle_boards(picks, rng).reshape(count, n * n)


def augment_rows(rows: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Training rows (B, n*n) of ids 0..n-1, each under its own random symmetry (band, stack,
    line and digit permutations, transpose): a valid board stays valid, so a few thousand
    boards stand for many more (the looped-Sudoku literature's augmentation, ../shared/LOOPS.md)."""
    boards = np.asarray(rows).reshape(-1, n, n) + 1
    return (shuffle_boards(boards, rng) - 1).reshape(len(boards), n * n).astype(np.asarray(rows).dtype)


def is_valid_board(board: np.ndarray, n: int) -> bool:
    flat = np.asarray(board).reshape(-1)
    want = set(range(1, n + 1))
    return all(set(flat[u].tolist()) == want for u in units(n))


def solves(board: np.ndarray, puzzle: np.ndarray, n: int) -> bool:
    """Any valid completion consistent with the givens counts as solved."""
    board, puzzle = np.asarray(board).reshape(-1), np.asarray(puzzle).reshape(-1)
    given = puzzle > 0
    return bool((board[given] == puzzle[given]).all()) and is_valid_board(board, n)


def deduction_rounds(puzzle: np.ndarray, n: int, max_rounds: int = 64) -> int | None:
    """Parallel rounds of naked + hidden singles that solve `puzzle`; None if singles get stuck."""
    grid = np.asarray(puzzle).reshape(-1).copy()
    us = units(n)
    for rounds in range(max_rounds + 1):
        if (grid > 0).all():
            return rounds
        fills: dict[int, int] = {}
        cands = {c: set(_candidates(grid.tolist(), n, c)) for c in np.flatnonzero(grid == 0).tolist()}
        if any(not s for s in cands.values()):
            return None  # contradiction: not a valid puzzle
        for c, s in cands.items():  # naked singles
            if len(s) == 1:
                fills[c] = next(iter(s))
        for u in us:  # hidden singles
            for d in range(1, n + 1):
                places = [int(c) for c in u if int(c) in cands and d in cands[int(c)]]
                if len(places) == 1 and not (grid[u] == d).any():
                    fills.setdefault(places[0], d)
        if not fills:
            return None
        for c, d in fills.items():
            grid[c] = d
    return None


def make_puzzle(solution: np.ndarray, n: int, n_blanks: int, rng: np.random.Generator) -> np.ndarray:
    """Blank cells of `solution` in random order while the solution stays unique, up to `n_blanks`."""
    puzzle = np.asarray(solution).reshape(-1).copy()
    blanks = 0
    for cell in rng.permutation(n * n):
        if blanks >= n_blanks:
            break
        keep = puzzle[cell]
        puzzle[cell] = 0
        if count_solutions(puzzle, n, limit=2) == 1:
            blanks += 1
        else:
            puzzle[cell] = keep
    return puzzle


# --------------------------------------------------------------------------- the task spec

def test_set(data, rows: np.ndarray, picked: np.ndarray, seed: int, answer_len: int) -> dict:
    """Puzzles made from validation boards by blanking cells while the solution stays unique;
    difficulty = rounds of single-deduction (-1: singles get stuck)."""
    n = int(data.meta["task_size"])
    mask_id = data.vocab_size
    lo, hi = PUZZLE_BLANKS[n]
    rng = np.random.default_rng(seed)
    puzzles, difficulty = [], []
    for board in rows + 1:  # digits 1..n
        puzzle = make_puzzle(board, n, int(rng.integers(lo, hi + 1)), rng)
        puzzles.append(puzzle)
        rounds = deduction_rounds(puzzle, n)
        difficulty.append(-1 if rounds is None else rounds)
    puzzles = np.stack(puzzles)
    x = np.where(puzzles == 0, mask_id, puzzles - 1)
    return {"task": "sudoku", "x": x, "target": rows, "difficulty": np.array(difficulty), "size": n}


def score(test: dict, filled: np.ndarray, mask_id: int) -> dict:
    """Boards solved (any valid completion counts) and cell accuracy, overall and by difficulty."""
    x, target = test["x"], test["target"]
    blank = x == mask_id
    correct = (filled == target) & blank
    n = test["size"]
    solved = np.array([solves(f + 1, np.where(b, 0, xi + 1), n) for f, b, xi in zip(filled, blank, x)])
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


def describe(r: dict) -> str:
    diffs = "  ".join(f"{k}:{v['solved']:.2f}(n={v['n']})" for k, v in r["by_difficulty"].items())
    return f"solved {r['solved']:.3f}  cell accuracy {r['cell_acc']:.3f}  by rounds {diffs}"


TASK = Task(
    name="sudoku",
    description="solved n x n Sudoku boards (size 4, 6 or 9), row-major; token id = digit - 1",
    symbols=lambda size, hops: [str(d) for d in range(1, size + 1)],
    seq_len=lambda size, hops: size * size,
    prompt_len=lambda size, hops: 0,
    examples=lambda size, hops, count, seed: random_boards(size, count, seed) - 1,
    check=lambda size, hops: box_shape(size),
    scoring=Scoring(
        test_set=test_set, score=score, describe=describe, headline=("solved", "boards solved"),
        tables=lambda record: (PerS("cell_acc", "cell accuracy", lambda r: r["cell_acc"]),
                               ByDifficulty("solved", "boards solved by difficulty",
                                            "rounds of naked/hidden singles; n = puzzles")),
        answer_symbols=lambda meta: int(meta["task_size"])),
    augment=lambda rows, size, rng: augment_rows(rows, size, rng),
)
