"""The halting benchmark on a task (benchmarks/halting_solve.py, evaluation/halting_*.py): the
oracle decodes exactly as fixed S_max while its loop counts adapt, the paired s.e. and the
"matches" rule by hand, the saving at equal quality, and the script end to end on a tiny run."""

import json
import math

import numpy as np
import pytest
import torch

from loopmdm.config import ModelConfig
from loopmdm.errors import LoopMDMError
from loopmdm.evaluation import halting_bench as hb
from loopmdm.evaluation import halting_stats as hs
from loopmdm.model.denoiser import LoopedDenoiser
from loopmdm.sampling.loop_runner import LoopRunner
from tests.test_halting import V, ContractingStub



def _rows(masked_counts, L=16):
    x = np.tile(np.arange(L) % V, (len(masked_counts), 1))
    for i, m in enumerate(masked_counts):
        x[i, :m] = V
    return x


def _setup(x, s_max, mask_id=V, num_symbols=V):
    return hb.Setup(test={"task": "sudoku", "x": x}, mask_id=mask_id, order="raster", num_symbols=num_symbols,
                    s_max=s_max, batch_size=2)  # two batches of rows: the puzzle offsets must carry over


# ----------------------------------------------------------------- (a) the oracle
def test_oracle_decodes_as_fixed_s_max_and_its_loops_follow_the_stub():
    """ContractingStub: a masked position's top-1 flips from 1 to 0 once r^k < 1/2, r = 0.3 + 0.6 m
    (m the row's masked fraction) -- so the oracle's k is known per call, and differs by row."""
    s_max = 8
    x = _rows([14, 8, 2, 11])
    fixed, _, _ = hb.decode(_setup(x, s_max), LoopRunner(ContractingStub()), s_max)
    oracle = hb.OracleDenoiser(ContractingStub(), s_max, "raster", V)
    filled, log, _ = hb.decode(_setup(x, s_max), oracle, s_max)
    np.testing.assert_array_equal(filled, fixed)
    assert len(log.loops) == 14 + 8 + 2 + 11  # one row-call per blank; finished rows are not counted
    assert all(1 <= k <= s_max for k in log.loops) and len(set(log.loops)) > 1
    for puzzle, k, step in zip(log.puzzle, log.loops, log.step):
        m = ([14, 8, 2, 11][puzzle] - step) / 16  # the row's masked fraction at that call
        r = 0.3 + 0.6 * m
        assert k == next(j for j in range(1, s_max + 1) if r ** j < 0.5), (puzzle, step, k)
    assert log.settled == log.loops  # the stub never flips back


def test_oracle_equals_fixed_s_max_on_a_tiny_real_model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=6, n_layers=3, d_model=32, n_heads=2, cond_dim=16, loop_start=1, loop_end=2,
                      max_train_loops=4)
    model = LoopedDenoiser(cfg).eval()
    with torch.no_grad():  # adaLN-Zero would make every block the identity: give it weights
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    x = np.random.default_rng(0).integers(0, 6, (5, 12))
    x[:, ::2] = 6  # mask id = vocab_size
    setup = _setup(x, 4, mask_id=6, num_symbols=6)
    fixed, _, _ = hb.decode(setup, LoopRunner(model), 4)
    filled, log, _ = hb.decode(setup, hb.OracleDenoiser(model, 4, "raster", 6), 4)
    np.testing.assert_array_equal(filled, fixed)
    assert all(1 <= k <= s <= 4 for k, s in zip(log.loops, log.settled))


# ----------------------------------------------------------------- (b) noise band
def test_paired_se_and_matches_by_hand():
    ref = [1, 0, 0, 1, 1]  # S_max: 0.6
    same_rate = [1, 1, 0, 1, 0]  # 0.6, d = [0, 1, 0, 0, -1]: sd = sqrt(2/4)
    worse = [0, 0, 0, 1, 0]  # 0.2, d = [-1, 0, 0, 0, -1]: mean -0.4, sd = sqrt(1.2/4)
    assert hs.paired_se(same_rate, ref) == pytest.approx(math.sqrt(0.5) / math.sqrt(5))
    assert hs.paired_se(worse, ref) == pytest.approx(math.sqrt(0.3) / math.sqrt(5))  # 0.245
    rows = [{"solved": float(np.mean(v)), "per_puzzle_solved": v} for v in (ref, same_rate, worse)]
    rows.append({"solved": 0.4, "per_puzzle_solved": [1, 0, 0, 1, 0]})  # d = [0,0,0,0,-1]: se 0.2 -> 0.4 >= 0.4
    hs.compare_to(rows, rows[0])
    assert [r["matches"] for r in rows] == [True, True, False, True]
    assert rows[2]["diff_vs_ref"] == pytest.approx(-0.4) and rows[3]["se_vs_ref"] == pytest.approx(0.2)


# ----------------------------------------------------------------- (c) saving
def _row(kind, label, loops, solved, n_calls=10, **kw):
    n = len(solved)
    return {"kind": kind, "label": label, "mean_loops": loops, "solved": float(np.mean(solved)),
            "per_puzzle_solved": solved, "per_puzzle_loop_sum": [loops * n_calls] * n,
            "per_puzzle_calls": [n_calls] * n, **kw}


def test_saving_at_equal_quality():
    n = 20
    good = [1] * 16 + [0] * 4
    rows = [_row("fixed", f"S = {s}", s, good if s >= 4 else [0] * n, S=s) for s in (1, 2, 4, 8)]
    rows += [_row("rule", "kl tau=0.01", 3.0, good, rule="kl"), _row("rule", "kl tau=0.1", 1.5, [0] * n, rule="kl"),
             _row("rule", "flips tau=0.1", 2.0, [0] * n, rule="flips"), _row("oracle", "oracle", 2.5, good),
             _row("mdm", "MDM", 1.0, [0] * n)]
    hs.compare_to(rows, rows[3])
    sv = hs.savings(rows, 8)
    assert sv["fixed"] == {"saving": 2.0, "loops": 4, "label": "S = 4"}  # S = 4 already matches S_max = 8
    assert sv["kl"]["saving"] == pytest.approx(8 / 3) and sv["kl"]["label"] == "kl tau=0.01"
    assert sv["flips"]["saving"] is None and sv["oracle"]["saving"] == pytest.approx(3.2)
    assert "MDM" not in {v["label"] for v in sv.values()}
    bands = hs.bootstrap_savings(rows, rows[3], 8, resamples=200)
    assert bands["fixed"]["band"] == [2.0, 2.0] and bands["flips"]["band"] == [1.0, 1.0]  # no match: run S_max
    assert bands["kl"]["vs_fixed"] == pytest.approx([4 / 3, 4 / 3]) and bands["flips"]["p_match"] == 0.0


def test_rules_spelling_and_curves():
    assert hb.parse_rule_taus("change-scaled:0.05,0.1;kl:1e-3") == [("change-scaled", [0.05, 0.1]), ("kl", [1e-3])]
    assert hb.parse_rule_taus("change:0.1:0.05,flips:0.2") == [("change", [0.1, 0.05]), ("flips", [0.2])]
    for bad in ("nope:0.1", "kl", "kl:-1", "kl:x"):
        with pytest.raises(LoopMDMError):
            hb.parse_rule_taus(bad)
    assert hs.histogram([1, 2, 2, 8, 1.4]) == {1: 2, 2: 2, 8: 1}
    bins = hs.by_bins([1.0, 0.95, 0.5, 0.05], [8, 6, 3, 1], bins=2)
    assert [(b["n"], b["mean_loops"]) for b in bins] == [(2, 2.0), (2, 7.0)]
    assert hb.min_loops_for("flips") == 2 and hb.min_loops_for("change-scaled") == 1
    assert hb.parse_loops("1, 2,8") == [1, 2, 8]
    for bad in ("", "0,2", "a,b", "1.5"):
        with pytest.raises(LoopMDMError, match="--loops"):
            hb.parse_loops(bad)


# ----------------------------------------------------------------- (d) the script end to end
@pytest.fixture(scope="module")
def sudoku_runs(tmp_path_factory):
    from loopmdm.config import load_config
    from tests.conftest import tiny_overrides
    from loopmdm.training.run import train

    root = tmp_path_factory.mktemp("halting_solve")
    task = ["data.source=task", "data.task=sudoku", "data.task_size=4", "data.task_examples=200",
            "data.val_fraction=0.2", "data.test_fraction=0.3", "train.max_steps=4", "train.eval_every=2",
            "model.max_train_loops=4"]
    train(load_config(None, tiny_overrides(root) + task + [f"train.out_dir={root / 'loop'}"]))
    train(load_config(None, tiny_overrides(root) + task + [f"train.out_dir={root / 'mdm'}", "model.loop_start=null",
                                                           "model.loop_end=null"]))
    return root


def test_script_writes_its_three_files_with_sane_values(sudoku_runs, tmp_path):
    from tests.conftest import benchmark_module

    halting_solve = benchmark_module("halting_solve")
    out = tmp_path / "out"
    assert halting_solve.main([str(sudoku_runs / "loop"), "--mdm", str(sudoku_runs / "mdm"), "--num", "6",
                               "--loops", "1,2", "--rules", "change-scaled:0.05,0.2;kl:1e-3", "--resamples", "50",
                               "--timing-repeats", "1", "--out", str(out)]) == 0
    for name in ("halting_solve.json", "halting_solve.md", "quality_vs_loops.png", "loops_vs_masked.png", "calls.npz"):
        assert (out / name).stat().st_size > 0, name
    result = json.loads((out / "halting_solve.json").read_text())
    assert result["split"] == "test" and result["n"] == 6 and result["weights"].startswith("best-validation")
    assert result["settings"]["s_max"] == 4 and result["reference"] == "S = 4"
    rows = {r["label"]: r for r in result["rows"]}
    assert set(rows) == {"S = 1", "S = 2", "S = 4", "change-scaled tau=0.05", "change-scaled tau=0.2",
                         "kl tau=0.001", "oracle", "MDM"}
    assert rows["S = 2"]["mean_loops"] == 2.0 and rows["MDM"]["mean_loops"] == 1.0
    assert rows["oracle"]["per_puzzle_solved"] == rows["S = 4"]["per_puzzle_solved"]
    for r in result["rows"]:
        assert 0 <= r["solved"] <= 1 and len(r["per_puzzle_solved"]) == 6 and r["se_vs_ref"] >= 0
        assert 1 <= r["mean_loops"] <= 4 and sum(r["hist"].values()) == sum(r["per_puzzle_calls"])
        if r["kind"] == "rule":
            assert r["granularity"] == "sequence"
    assert rows["kl tau=0.001"]["min_loops"] == 2 and rows["kl tau=0.001"]["mean_loops"] >= 2
    assert set(result["savings"]) == {"fixed", "change-scaled", "kl", "oracle"}
    assert result["savings"]["fixed"]["saving"] >= 1 and result["token_timing"]["time_ratio"] > 0
    md = (out / "halting_solve.md").read_text()
    assert "| oracle |" in md and "Saving at equal quality" in md and "Per-token halting" in md
    with np.load(out / "calls.npz") as calls:
        assert len(calls["0:S = 1:loops"]) == sum(rows["S = 1"]["per_puzzle_calls"])
