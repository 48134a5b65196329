"""The halting benchmark on text (benchmarks/halting_text.py, evaluation/halting_text.py): every
row of a table sees the same rows, unmasking positions and draws; loops are logged per row, so
a rule that halts every call alike cannot hide; the oracle decodes exactly as fixed S_max; the
paired statistics with a lower-is-better score by hand; reference and unigram rows; and the
script end to end on tiny runs."""

import json
import math

import numpy as np
import pytest
import torch

from loopmdm.diffusion.schedule import make_schedule
from loopmdm.evaluation import halting_stats as hs
from loopmdm.evaluation import halting_text as ht
from loopmdm.evaluation.judge import ar_loss
from loopmdm.sampling.halting import Halting
from loopmdm.sampling.loop_runner import LoopRunner
from tests.test_halting import V, ContractingStub



def _blocks(n=40, L=16, seed=0):
    """Rows whose first token is their index (so a row's origin can be read off)."""
    x = np.random.default_rng(seed).integers(0, V, (n, L))
    x[:, 0] = np.arange(n) % V
    return x


def _setup(kind="infill", n=6, temperature=0.0, s_max=4, batch_size=4, **kw):
    make = ht.infill_setup if kind == "infill" else ht.samples_setup
    return make(_blocks(), n, V, steps=6, temperature=temperature, seed=3, s_max=s_max,
                schedule=make_schedule("loglinear", 1e-3), batch_size=batch_size, **kw)


# ----------------------------------------------------------------- (a) the rows every setting shares
def test_reference_rows_are_spread_over_the_split_and_the_middle_half_is_masked():
    blocks = np.arange(100)[:, None] * np.ones((1, 16), dtype=np.int64)  # row i holds i everywhere
    setup = ht.infill_setup(blocks % V, 5, V, steps=4, temperature=0.0, seed=0, s_max=4,
                            schedule=make_schedule("loglinear", 1e-3))
    rows = ht.reference_rows(blocks, 5)[:, 0]
    assert rows.tolist() == [0, 25, 50, 74, 99]  # first to last, not the first five
    np.testing.assert_array_equal(setup.truth, blocks[rows] % V)
    assert (setup.template[:, 4:12] == V).all() and (setup.template[:, :4] == setup.truth[:, :4]).all()
    assert (setup.template[:, 12:] == setup.truth[:, 12:]).all() and setup.scored_from == 4
    assert (ht.samples_setup(blocks % V, 5, V, steps=4, temperature=1.0, seed=0, s_max=4,
                             schedule=None).template == V).all()


@pytest.mark.parametrize("kind,temperature", [("infill", 0.0), ("samples", 1.0)])
def test_every_setting_unmasks_the_same_positions_at_the_same_steps(kind, temperature):
    """The draws that choose which positions a step commits come before the prediction is read,
    so fixed S = 1, S = 4, a halting rule and the oracle must commit the same positions of the
    same rows at the same steps -- else the paired comparison would compare different draws."""
    setup = _setup(kind, temperature=temperature)
    logs = []
    for denoiser, loops in ((LoopRunner(ContractingStub()), 1), (LoopRunner(ContractingStub()), 4),
                            (LoopRunner(ContractingStub(), halting=Halting(0.05, 1, "sequence", "change-masked",
                                                                            cap=4)), 4),
                            (ht.CommitOracle(ContractingStub(), 4), 4)):
        tokens, log, _ = ht.decode(setup, denoiser, loops)
        assert (tokens != V).all() and (tokens[setup.template != V] == setup.template[setup.template != V]).all()
        logs.append(log)
    for log in logs[1:]:
        assert (log.example, log.step, log.t, log.committed) == (logs[0].example, logs[0].step, logs[0].t,
                                                                 logs[0].committed)
    assert sorted(set(logs[0].example)) == list(range(6))  # both batches, offsets carried over
    assert sum(logs[0].committed) == int((setup.template == V).sum())  # every masked position, once


def test_rule_loops_are_logged_per_row_and_differ_between_rows_built_to_differ():
    """Rows of one batch with many and few masked positions: with per-row halting the stub's
    crowded rows need more loops. A log that recorded the call's loop count for every row (or a
    rule that halted every call at one count) would give one value."""
    setup = _setup("infill", n=6)
    setup.template[::2, :] = V  # every other row fully masked: crowded
    halting = Halting(0.05, 1, "sequence", "change-masked", cap=8)
    row = ht.measure(setup, LoopRunner(ContractingStub(), halting=halting), 8, kind="rule", label="r")
    hs.summarise_calls(row)
    loops = np.asarray(row["calls"]["loops"])
    first = np.asarray(row["calls"]["step"]) == 0
    crowded = np.isin(row["calls"]["example"], [0, 2, 4])
    assert len(row["hist"]) > 1 and loops[first & crowded].min() > loops[first & ~crowded].max()
    fixed = ht.measure(setup, LoopRunner(ContractingStub()), 3, kind="fixed", label="S = 3", S=3)
    hs.summarise_calls(fixed)
    assert fixed["hist"] == {3: sum(fixed["per_puzzle_calls"])}


# ----------------------------------------------------------------- (b) the oracle
def test_oracle_decodes_as_fixed_s_max_and_its_loops_follow_the_stub():
    """Greedy decoding commits S_max's argmax, so the oracle's tokens are fixed S_max's; its k per
    row-call is the first j with r^j < 1/2 (r = 0.3 + 0.6 m, m the row's masked fraction at the
    call), or 1 where the step committed nothing in the row."""
    setup = _setup("infill", n=6)
    s_max = 8
    setup.s_max = s_max
    fixed, _, _ = ht.decode(setup, LoopRunner(ContractingStub()), s_max)
    tokens, log, _ = ht.decode(setup, ht.CommitOracle(ContractingStub(), s_max), s_max)
    np.testing.assert_array_equal(tokens, fixed)
    L = setup.template.shape[1]
    for t, k, committed, s in zip(log.t, log.loops, log.committed, log.settled):
        m = t * 8 / L  # the row's masked fraction (8 of 16 positions masked at the start)
        want = next(j for j in range(1, s_max + 1) if (0.3 + 0.6 * m) ** j < 0.5) if committed else 1
        assert k == want and s == k, (t, committed, k)
    assert len(set(log.loops)) > 1


# ----------------------------------------------------------------- (c) statistics by hand
def test_paired_statistics_with_a_lower_is_better_score():
    ref = {"acc": 0.5, "per_row_acc": [0.5, 0.5, 0.5, 0.5], "judge_nll": 2.0, "per_row_judge_nll": [2, 2, 2, 2]}
    close = {"acc": 0.5, "per_row_acc": [0.6, 0.4, 0.5, 0.5], "judge_nll": 2.05,
             "per_row_judge_nll": [2.1, 2.0, 2.1, 2.0]}  # d = [.1, 0, .1, 0]: mean .05, se .029
    worse_nll = {"acc": 0.5, "per_row_acc": [0.5] * 4, "judge_nll": 2.5, "per_row_judge_nll": [2.4, 2.6, 2.5, 2.5]}
    better_nll = {"acc": 0.5, "per_row_acc": [0.5] * 4, "judge_nll": 1.5, "per_row_judge_nll": [1.4, 1.6, 1.5, 1.5]}
    rows = [ref, close, worse_nll, better_nll]
    hs.compare_to(rows, ref, ht.MEASURES["infill"])
    se_close = np.std([0.1, 0, 0.1, 0], ddof=1) / 2  # 0.0289 < 0.05: close is worse by more than 1 s.e.
    assert close["vs_ref"]["judge_nll"]["se"] == pytest.approx(se_close)
    assert close["vs_ref"]["judge_nll"]["diff"] == pytest.approx(0.05)
    assert [r["matches"] for r in rows] == [True, False, False, True]  # lower NLL is better, not worse
    assert close["diff_vs_ref"] == 0.0 and close["vs_ref"]["acc"]["matches"]  # the first measure stays in front
    # one s.e. of slack: the same NLL difference with noisier rows matches
    noisy = {"acc": 0.5, "per_row_acc": [0.5] * 4, "judge_nll": 2.05, "per_row_judge_nll": [2.3, 1.8, 2.3, 1.8]}
    hs.compare_to([noisy], ref, ht.MEASURES["infill"])
    se_noisy = np.std([0.3, -0.2, 0.3, -0.2], ddof=1) / 2  # 0.144 > 0.05
    assert noisy["matches"] and noisy["vs_ref"]["judge_nll"]["se"] == pytest.approx(se_noisy)


def _row(kind, label, loops, acc, nll, **kw):
    n = len(acc)
    return {"kind": kind, "label": label, "mean_loops": loops, "acc": float(np.mean(acc)), "per_row_acc": acc,
            "judge_nll": float(np.mean(nll)), "per_row_judge_nll": nll, "per_puzzle_loop_sum": [loops * 4.0] * n,
            "per_puzzle_calls": [4] * n, **kw}


def test_saving_needs_every_score_to_match():
    n = 12
    good_acc, good_nll = [0.5] * n, [2.0] * n
    rows = [_row("fixed", f"S = {s}", s, good_acc if s >= 2 else [0.3] * n, good_nll, S=s) for s in (1, 2, 4)]
    rows += [_row("rule", "kl tau=0.1", 1.5, good_acc, [2.5] * n, rule="kl"),  # right chars, worse NLL
             _row("rule", "kl tau=0.01", 3.0, good_acc, good_nll, rule="kl"),
             _row("reference", "test text", 0.0, [1.0] * n, [1.0] * n)]
    hs.compare_to(rows, rows[2], ht.MEASURES["infill"])
    sv = hs.savings(rows, 4)
    assert sv["fixed"]["label"] == "S = 2" and sv["kl"]["label"] == "kl tau=0.01"  # not the cheaper tau=0.1
    assert "test text" not in {v["label"] for v in sv.values()}
    bands = hs.bootstrap_savings(rows, rows[2], 4, resamples=100, measures=ht.MEASURES["infill"])
    assert bands["kl"]["band"] == [4 / 3, 4 / 3] and bands["fixed"]["band"] == [2.0, 2.0]


# ----------------------------------------------------------------- (d) scores and reference rows
def test_unigram_row_draws_from_the_train_unigram_at_the_masked_positions_only(tmp_path):
    np.save(tmp_path / "train_unigram_counts.npy", np.array([0, 700, 300, 0]))
    unigram = ht.train_unigram(type("P", (), {"path": tmp_path})())
    np.testing.assert_allclose(unigram, [0, 0.7, 0.3, 0])
    setup = ht.infill_setup(_blocks(400), 400, V, steps=4, temperature=0.0, seed=0, s_max=4, schedule=None)
    drawn = ht.unigram_tokens(setup, unigram, seed=1)
    blank = setup.template == V
    np.testing.assert_array_equal(drawn[~blank], setup.template[~blank])
    counts = np.bincount(drawn[blank], minlength=V) / blank.sum()
    assert counts[0] == 0 and counts[3] == 0 and abs(counts[1] - 0.7) < 0.02
    np.testing.assert_array_equal(drawn, ht.unigram_tokens(setup, unigram, seed=1))  # seeded


def test_judge_nll_per_token_is_the_judges_loss_and_the_span_is_scored():
    from loopmdm.config import ModelConfig
    from loopmdm.model.denoiser import LoopedDenoiser

    torch.manual_seed(0)
    judge = LoopedDenoiser(ModelConfig(vocab_size=V, n_layers=2, d_model=16, n_heads=2, cond_dim=8, loop_start=None,
                                       loop_end=None, causal=True)).eval()
    with torch.no_grad():
        for p in judge.parameters():
            p.normal_(0.0, 0.3)
    tokens = _blocks(5)
    per_token = ht.judge_token_nll(judge, tokens, batch_size=2)
    assert per_token.shape == (5, 15)
    with torch.no_grad():
        loss = float(ar_loss(judge, torch.as_tensor(tokens)).loss)
    assert per_token.mean() == pytest.approx(loss, rel=1e-5)
    setup = _setup("infill", n=5, judge=judge)
    got = ht.scores(setup, setup.truth)
    np.testing.assert_allclose(got["per_row_judge_nll"], ht.judge_token_nll(judge, setup.truth)[:, 3:].mean(1))
    assert got["acc"] == 1.0 and got["gen_ppl"] == pytest.approx(math.exp(got["judge_nll"]))


# ----------------------------------------------------------------- (e) the script end to end
@pytest.fixture(scope="module")
def text_runs(tmp_path_factory):
    from loopmdm.config import load_config
    from loopmdm.training.run import train
    from tests.conftest import tiny_overrides

    root = tmp_path_factory.mktemp("halting_text")
    base = tiny_overrides(root) + ["data.test_fraction=0.3", "train.max_steps=4", "train.eval_every=2",
                                   "model.max_train_loops=3"]
    train(load_config(None, base + [f"train.out_dir={root / 'loop'}"]))
    no_loop = ["model.loop_start=null", "model.loop_end=null"]
    train(load_config(None, base + no_loop + [f"train.out_dir={root / 'mdm'}"]))
    train(load_config(None, base + no_loop + ["model.causal=true", f"train.out_dir={root / 'judge'}"]))
    return root


def test_script_writes_its_files_with_the_same_rows_everywhere(text_runs, tmp_path):
    from tests.conftest import benchmark_module

    halting_text = benchmark_module("halting_text")
    out = tmp_path / "out"
    assert halting_text.main([str(text_runs / "loop"), "--mdm", str(text_runs / "mdm"), "--judge",
                              str(text_runs / "judge"), "--infill", "5", "--samples", "3", "--steps", "4",
                              "--loops", "1,2", "--rules", "change-scaled:0.05;kl:1e-3", "--resamples", "50",
                              "--timing-rows", "3", "--timing-repeats", "1", "--timing-rules", "change-scaled:0.05", "--judge-test-rows", "8",
                              "--batch-size", "4", "--out", str(out)]) == 0
    for name in ("halting_text.json", "halting_text.md", "quality_vs_loops.png", "loops_vs_masked.png",
                 "loops_hist.png", "calls.npz"):
        assert (out / name).stat().st_size > 0, name
    result = json.loads((out / "halting_text.json").read_text())
    assert result["settings"]["s_max"] == 3 and result["settings"]["split"] == "test"
    assert result["judge_test_nll"] > 0 and result["weights"].startswith("best-validation")
    labels = ["S = 1", "S = 2", "S = 3", "change-scaled tau=0.05", "kl tau=0.001", "MDM", "test text", "train unigram"]
    assert [r["label"] for r in result["infill"]["rows"]] == labels[:5] + ["oracle"] + labels[5:]
    assert [r["label"] for r in result["samples"]["rows"]] == labels  # no oracle at temperature 1
    with np.load(out / "calls.npz") as calls:
        for key, n in (("infill", 5), ("samples", 3)):
            rows = result[key]["rows"]
            model_rows = [i for i, r in enumerate(rows) if r["kind"] != "reference"]
            ref = calls[f"{key}:0:S = 1:committed"]
            for i in model_rows:  # the same rows, steps and unmasked positions in every model row
                r = rows[i]
                assert r["n"] == n and len(r["per_row_judge_nll"]) == n and len(r["per_puzzle_calls"]) == n
                np.testing.assert_array_equal(calls[f"{key}:{i}:{r['label']}:committed"], ref)
                assert 1 <= r["mean_loops"] <= 3 and r["se_vs_ref"] >= 0
            assert rows[-1]["kind"] == "reference" and rows[-1]["entropy"] > 0
    infill = {r["label"]: r for r in result["infill"]["rows"]}
    assert infill["test text"]["acc"] == 1.0 and infill["S = 2"]["mean_loops"] == 2.0
    assert infill["oracle"]["per_row_acc"] == infill["S = 3"]["per_row_acc"]
    assert infill["kl tau=0.001"]["min_loops"] == 2 and infill["MDM"]["mean_loops"] == 1.0
    assert set(result["infill"]["savings"]) == {"fixed", "change-scaled", "kl", "oracle"}
    timed = {(t["rule"], t["tau"]): t for t in result["token_timing"]}
    assert ("change-scaled", 0.05) in timed and len(timed) == len(result["token_timing"])  # asked for, once
    assert all(t["time_ratio"] > 0 and t["n"] == 3 and t["computed_flops_ratio"] > 0 for t in timed.values())
    md = (out / "halting_text.md").read_text()
    assert "Infill (primary): 5 rows" in md and "Unconditional samples: 3 rows" in md and "Per-token halting" in md
