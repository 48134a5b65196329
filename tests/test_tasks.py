"""Depth-hungry tasks: generators, puzzles, task data preparation, decoding orders, scoring."""

import numpy as np
import pytest
import torch

from loopmdm.config import load_config
from loopmdm.data.prepare import prepare_data
from loopmdm.diffusion.objective import diffusion_loss, maskable_after
from loopmdm.diffusion.schedule import make_schedule
from loopmdm.errors import LoopMDMError
from loopmdm.evaluation.solve import score, solve_task, task_test_set
from loopmdm.sampling.infill import fill_blanks
from loopmdm.tasks import khop, sudoku


@pytest.mark.parametrize("n", [4, 6, 9])
def test_random_boards_are_valid_and_varied(n):
    boards = sudoku.random_boards(n, 200, seed=1, n_base=4)
    assert all(sudoku.is_valid_board(b, n) for b in boards)
    assert len({b.tobytes() for b in boards}) > (100 if n == 4 else 190)  # symmetries re-randomise 4 base fills (4x4 has only 288 grids)
    broken = boards[0].copy()
    broken[[0, 1]] = broken[[1, 0]]
    assert not sudoku.is_valid_board(broken, n)


def test_puzzles_have_unique_solutions_and_difficulty():
    rng = np.random.default_rng(0)
    board = sudoku.random_boards(6, 1, seed=3)[0]
    puzzle = sudoku.make_puzzle(board, 6, 20, rng)
    assert (puzzle == 0).sum() == 20
    assert ((puzzle == board) | (puzzle == 0)).all()
    assert sudoku.count_solutions(puzzle, 6) == 1
    assert sudoku.deduction_rounds(board, 6) == 0
    one_blank = board.copy()
    one_blank[7] = 0
    assert sudoku.deduction_rounds(one_blank, 6) == 1
    rounds = sudoku.deduction_rounds(puzzle, 6)
    assert rounds is None or rounds >= 1
    assert sudoku.solves(board, puzzle, 6)
    wrong = board.copy()
    blank = int(np.flatnonzero(puzzle == 0)[0])
    wrong[blank] = wrong[blank] % 6 + 1
    assert not sudoku.solves(wrong, puzzle, 6)


def _swappable_rectangle(board: np.ndarray, n: int) -> list[int]:
    """Four cells (r1, c1), (r1, c2), (r2, c1), (r2, c2) holding a, b / b, a that lie in exactly
    two boxes: swapping a and b there keeps every row, column and box valid (an unavoidable set)."""
    br, bc = sudoku.box_shape(n)
    grid = board.reshape(n, n)
    for r1 in range(n):
        for r2 in range(r1 + 1, n):
            for c1 in range(n):
                for c2 in range(c1 + 1, n):
                    cells = [(r1, c1), (r1, c2), (r2, c1), (r2, c2)]
                    boxes = {(r // br, c // bc) for r, c in cells}
                    if (grid[r1, c1] == grid[r2, c2] and grid[r1, c2] == grid[r2, c1] and len(boxes) == 2):
                        return [r * n + c for r, c in cells]
    raise AssertionError("no swappable rectangle")


def test_a_different_valid_completion_of_the_same_puzzle_counts_as_solved():
    """A puzzle with two solutions (the four cells of a swappable rectangle blank): the scorer
    counts the other solution as solved although its cells differ from the target, and still
    rejects an invalid board and a valid board that changes a given."""
    n = 6
    board = sudoku.random_boards(n, 1, seed=3)[0].reshape(-1)
    cells = _swappable_rectangle(board, n)
    other = board.copy()
    a, b = board[cells[0]], board[cells[1]]
    other[cells] = np.where(board[cells] == a, b, a)
    assert sudoku.is_valid_board(other, n) and (other != board).sum() == 4
    puzzle = board.copy()
    puzzle[cells] = 0
    puzzle[[i for i in range(n * n) if i not in cells][:4]] = 0  # a few more blanks, still both complete it
    assert sudoku.count_solutions(puzzle, n, limit=3) == 2
    assert sudoku.solves(board, puzzle, n) and sudoku.solves(other, puzzle, n)
    invalid = other.copy()
    invalid[cells[0]] = invalid[cells[1]]  # a repeated digit in a row
    assert not sudoku.solves(invalid, puzzle, n)
    given = int(np.flatnonzero(puzzle)[0])
    relabel = np.roll(np.arange(1, n + 1), 1)  # a valid board, but not the puzzle's: givens changed
    moved = relabel[board - 1]
    assert sudoku.is_valid_board(moved, n) and moved[given] != puzzle[given]
    assert not sudoku.solves(moved, puzzle, n)
    # the task's scorer: token ids are digits - 1, blanks hold mask_id, the target is `board`
    mask_id = n + 1
    x = np.where(puzzle == 0, mask_id, puzzle - 1)[None].repeat(4, 0)
    test = {"task": "sudoku", "x": x, "target": (board - 1)[None].repeat(4, 0), "difficulty": np.array([-1] * 4),
            "size": n}
    filled = np.stack([board, other, invalid, moved]) - 1
    result = score(test, filled, mask_id)
    blanks = int((puzzle == 0).sum())
    assert result["solved"] == 0.5  # board and other: solved; invalid and moved: not
    per_board = [sudoku.solves(f + 1, puzzle, n) for f in filled]
    assert per_board == [True, True, False, False]
    # cell accuracy is against the target: `other` gets the 4 swapped cells wrong
    expected_cells = [1.0, (blanks - 4) / blanks,
                      ((filled[2] == board - 1) & (puzzle == 0)).sum() / blanks,
                      ((filled[3] == board - 1) & (puzzle == 0)).sum() / blanks]
    assert result["cell_acc"] == pytest.approx(np.mean(expected_cells))


def test_ambiguous_puzzle_counts_several_solutions():
    board = sudoku.random_boards(4, 1, seed=0)[0].reshape(4, 4)
    empty = np.zeros(16, dtype=np.int64)
    assert sudoku.count_solutions(empty, 4, limit=5) == 5
    assert sudoku.count_solutions(board.reshape(-1), 4) == 1


def test_khop_answers_follow_the_listed_edges():
    x = khop.random_examples(8, 4, 300, seed=2)
    assert x.shape == (300, khop.seq_len(8, 4))
    for row in x:
        answers = row[khop.prompt_len(8):]
        np.testing.assert_array_equal(answers, khop.answers_from_prompt(row, 8, 4))
        assert len(set(answers.tolist()) | {int(row[8])}) == 5  # one cycle: no repeats within 4 hops
        assert sorted(((row[:8] - 8) // 8).tolist()) == list(range(8))  # every node has one listed edge
        assert answers.max() < 8 and row[:8].min() >= 8  # answers are nodes, the prompt's edges edge tokens
    assert len(khop.symbols(8)) == 8 + 64 and khop.symbols(8)[8 + 3 * 8 + 5] == "3>5"
    with pytest.raises(LoopMDMError, match="hops=8"):
        khop.check(8, 8)


@pytest.mark.parametrize("nodes,hops", [(8, 5), (8, 6), (8, 7), (16, 9), (5, 3), (3, 2)])
def test_khop_refuses_hops_past_half_the_cycle(nodes, hops):
    """Hop N - k on one N-cycle is k look-ups backwards: more than N // 2 hops is refused, by
    the task and by the config, with one line naming both settings and what is allowed."""
    with pytest.raises(LoopMDMError) as err:
        khop.check(nodes, hops)
    message = str(err.value)
    assert "\n" not in message
    assert f"data.task_hops={hops}" in message and f"data.task_size={nodes}" in message
    assert f"[1, {nodes // 2}]" in message
    with pytest.raises(LoopMDMError, match=f"data.task_hops={hops}"):
        load_config(None, ["data.source=task", "data.task=khop", f"data.task_size={nodes}", f"data.task_hops={hops}"])
    khop.check(nodes, nodes // 2)  # the largest allowed
    load_config(None, ["data.source=task", "data.task=khop", f"data.task_size={nodes}", f"data.task_hops={nodes // 2}"])


def _lookups(prompt: np.ndarray, nodes: int, start: int) -> dict:
    """Fewest edge look-ups from `start` to every node when each listed edge may be followed
    either way (forward: source -> target; backward: target -> source): breadth-first search."""
    edges = [(int(e - nodes) // nodes, int(e - nodes) % nodes) for e in prompt[:nodes]]
    dist, frontier = {start: 0}, [start]
    while frontier:
        nxt = []
        for node in frontier:
            for a, b in edges:
                for u, v in ((a, b), (b, a)):
                    if u == node and v not in dist:
                        dist[v] = dist[node] + 1
                        nxt.append(v)
        frontier = nxt
    return dist


def test_khop_has_no_backward_shortcut_at_any_allowed_setting():
    """For every (nodes, hops) the task accepts, the answer at hop k is no fewer than k look-ups
    from the start even when edges may be read backwards, in every example of a batch; so hop
    k needs k look-ups. (Accepting hops = N - 1 would fail here: that hop is 1 look-up back.)"""
    checked = 0
    for nodes in (3, 4, 5, 8, 9, 16):
        for hops in range(1, nodes):
            try:
                khop.check(nodes, hops)
            except LoopMDMError:
                continue
            x = khop.random_examples(nodes, hops, 40, seed=nodes * 100 + hops)
            for row in x:
                dist = _lookups(row, nodes, int(row[nodes]))
                answers = row[khop.prompt_len(nodes):]
                assert [dist[int(a)] for a in answers] == list(range(1, hops + 1)), (nodes, hops, row)
            checked += 1
    assert checked == sum(n // 2 for n in (3, 4, 5, 8, 9, 16))  # every allowed setting was generated


@pytest.mark.parametrize("scale", ["cpu-shallow10", "gpu"])
def test_khop_depth_scales_leave_no_answer_to_elimination(scale):
    """A depth probe at hop K must not be answerable with fewer look-ups by elimination: once every
    node fewer than K look-ups away (either way) is known, at least 2 candidates remain for hop K.
    On 8 nodes / 4 hops one remains (hop N / 2), which a 2-layer MDM used (khop cpu-shallow)."""
    from loopmdm.experiments.suites import get_suite

    cfg = load_config(get_suite("khop").config, list(get_suite("khop").scales[scale].overrides))
    nodes, hops = cfg.data.task_size, cfg.data.task_hops

    def candidates(n, k, seed):
        rows = khop.random_examples(n, k, 20, seed=seed)
        return min(sum(d >= k for d in _lookups(row, n, int(row[n])).values()) for row in rows)

    assert candidates(nodes, hops, 0) >= 2
    assert candidates(8, 4, 0) == 1  # the committed 8-node suites: hop 4 is the one node left


def _task_cfg(tmp_path, *extra):
    return load_config(None, ["data.source=task", f"data.cache_dir={tmp_path / 'cache'}", "data.task_examples=2000",
                              "data.val_fraction=0.1", *extra])


def test_task_data_is_disjoint_and_knows_its_prompt(tmp_path):
    cfg = _task_cfg(tmp_path, "data.task=khop", "data.task_size=6", "data.task_hops=3")
    assert cfg.data.seq_len == khop.seq_len(6, 3) and cfg.data.tokenizer == "task"
    data = prepare_data(cfg.data)
    train, val = np.asarray(data.blocks("train")), np.asarray(data.blocks("val"))
    assert train.shape == (2000, 10) and len(val) > 0
    assert not ({r.tobytes() for r in train} & {r.tobytes() for r in val})
    assert data.prompt_len == 7 and data.meta["answer_start"] == 7
    assert data.vocab_size == 6 + 36 + 2  # 6 nodes, 36 edge tokens, EOS, pad
    assert data.tokenizer.encode("n3 n0 3>5") == [3, 0, 6 + 3 * 6 + 5]
    dense = prepare_data(_task_cfg(tmp_path, "data.task=khop", "data.task_size=6", "data.task_hops=3",
                                   "data.task_prompt_given=false").data)
    assert dense.prompt_len == 0 and dense.meta["answer_start"] == 7


def test_tiny_sudoku_cannot_have_disjoint_splits(tmp_path):
    with pytest.raises(LoopMDMError, match="task_size=4"):
        prepare_data(_task_cfg(tmp_path, "data.task=sudoku", "data.task_size=4", "data.task_examples=20000").data)


def test_prompt_positions_are_never_masked_and_not_counted():
    class Uniform(torch.nn.Module):
        mask_id = 5

        def forward(self, x, num_loops, t=None, key_mask=None):
            return torch.zeros(*x.shape, 5)

    x0 = torch.randint(0, 5, (64, 10))
    maskable = maskable_after(6, x0)
    out = diffusion_loss(Uniform(), x0, make_schedule("loglinear", 1e-3), num_loops=1, eps=1e-3,
                         generator=torch.Generator().manual_seed(0), maskable=maskable)
    assert out.num_tokens == 64 * 4
    assert maskable_after(0, x0) is None


class Oracle(torch.nn.Module):
    """Logits that put all mass on the clean row (looked up by the given prefix) -- a perfect solver."""

    is_looped = True

    def __init__(self, targets, vocab, confidence_rank=None):
        super().__init__()
        self.targets, self.vocab, self.calls = torch.as_tensor(targets), vocab, []

    def forward(self, x, num_loops=1, t=None):
        self.calls.append(x.clone())
        return torch.nn.functional.one_hot(self.targets[: len(x)], self.vocab).float() * 10


@pytest.mark.parametrize("order", ["oneshot", "raster", "confidence"])
def test_decoding_orders_keep_givens_and_count_calls(order):
    targets = torch.randint(0, 4, (3, 8))
    x = targets.clone()
    x[:, [1, 4, 6]] = 9
    model = Oracle(targets, 6)
    out = fill_blanks(lambda x, s, t: model(x, s, t), x, 9, order, num_loops=2, num_symbols=4)
    assert torch.equal(out.tokens, targets)
    assert out.nfe == (1 if order == "oneshot" else 3)
    if order == "raster":  # row-major: after the first call only position 1 is filled
        assert (model.calls[1][:, 1] != 9).all() and (model.calls[1][:, 4] == 9).all()


def test_solve_scores_a_perfect_and_a_wrong_solver(tmp_path):
    data = prepare_data(_task_cfg(tmp_path, "data.task=sudoku", "data.task_size=6").data)
    test = task_test_set(data, 12, seed=0)
    assert ((test["x"] == data.vocab_size) | (test["x"] == test["target"])).all()
    perfect = solve_task(Oracle(test["target"], data.vocab_size), data, test, [1, 3], "raster", "cpu")
    assert [r["solved"] for r in perfect] == [1.0, 1.0] and perfect[0]["cell_acc"] == 1.0
    assert sum(v["n"] for v in perfect[0]["by_difficulty"].values()) == 12
    wrong = score(test, np.where(test["x"] == data.vocab_size, (test["target"] + 1) % 6, test["x"]), data.vocab_size)
    assert wrong["solved"] == 0.0 and wrong["cell_acc"] == 0.0


def test_khop_scoring_per_hop(tmp_path):
    data = prepare_data(_task_cfg(tmp_path, "data.task=khop", "data.task_size=6", "data.task_hops=3").data)
    test = task_test_set(data, 10)
    filled = test["target"].copy()
    filled[:5, -1] = (filled[:5, -1] + 1) % 6  # the last hop wrong in half the rows
    result = score(test, filled, data.vocab_size)
    assert result["per_hop"] == [1.0, 1.0, 0.5] and result["all_hops"] == 0.5


def test_sudoku_augmentation_keeps_boards_valid_and_is_seeded():
    rows = sudoku.random_boards(6, 16, seed=0) - 1
    rows = rows.reshape(16, 36)
    out = sudoku.augment_rows(rows, 6, np.random.default_rng(5))
    assert out.shape == rows.shape and out.dtype == rows.dtype
    assert all(sudoku.is_valid_board(b.reshape(6, 6) + 1, 6) for b in out)
    assert (out != rows).any(1).all()  # every board moved
    assert np.array_equal(out, sudoku.augment_rows(rows, 6, np.random.default_rng(5)))
    assert not np.array_equal(out, sudoku.augment_rows(rows, 6, np.random.default_rng(6)))


def test_task_augment_is_refused_where_no_symmetry_is_defined(tmp_path):
    with pytest.raises(LoopMDMError, match="task 'khop' defines no symmetries; tasks with them: sudoku"):
        _task_cfg(tmp_path, "data.task=khop", "data.task_size=6", "data.task_hops=3", "data.task_augment=true")
    with pytest.raises(LoopMDMError, match="data.task_augment=true is for data.source=task"):
        load_config(None, ["data.task_augment=true"])


def test_augmented_training_sees_valid_boards_and_resumes_exactly(tmp_path):
    from loopmdm.training.trainer import Trainer

    cfg = _task_cfg(tmp_path, "data.task=sudoku", "data.task_size=6", "data.task_augment=true",
                    "model.n_layers=2", "model.d_model=16", "model.n_heads=2", "model.cond_dim=8",
                    "model.loop_start=null", "model.loop_end=null", "train.batch_size=8",
                    f"train.out_dir={tmp_path / 'run'}")
    data = prepare_data(cfg.data)
    cfg.model.vocab_size = data.vocab_size
    trainer = Trainer(cfg, data, tmp_path / "run")
    seen = []
    trainer.augment = (lambda f: lambda rows, n, rng: seen.append(f(rows, n, rng)) or seen[-1])(trainer.augment)
    trainer.train_step()
    batch = seen[0]
    assert all(sudoku.is_valid_board(b.reshape(6, 6) + 1, 6) for b in batch)
    train_rows = {r.tobytes() for r in np.asarray(data.blocks("train")).astype(batch.dtype)}
    assert sum(r.tobytes() in train_rows for r in batch) < len(batch)  # not the stored rows
    again = Trainer(cfg, data, tmp_path / "run2")
    again.augment = (lambda f: lambda rows, n, rng: seen.append(f(rows, n, rng)) or seen[-1])(again.augment)
    again.train_step()
    assert np.array_equal(seen[1], batch)  # same seed and step: the same symmetries
