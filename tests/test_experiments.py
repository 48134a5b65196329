"""Experiment suites: arm construction (FLOPs matching), the FLOPs-to-match reading, and a
whole (tiny) suite run end to end, then resumed without retraining."""

import json
from pathlib import Path

import pytest
import torch

from loopmdm.config import load_config
from loopmdm.errors import LoopMDMError
from loopmdm.experiments import suites as suites_mod
from loopmdm.experiments.report import flops_to_match
from loopmdm.experiments.runner import run_suite
from loopmdm.experiments.suites import KNOB_ARMS, Scale, Suite, arm_overrides, get_suite, layer_passes
from loopmdm.model.flops import train_flops


def test_arms_match_the_loop_arms_expected_per_step_flops():
    suite = get_suite("sudoku")
    loop = load_config(suite.config)
    target = layer_passes(loop)  # 4 layers, 1 looped, S ~ U{1..8}: 4 + 3.5 = 7.5 layer passes
    assert target == 7.5
    deeper = load_config(suite.config, arm_overrides(suite, "deeper"))
    uniform = load_config(suite.config, arm_overrides(suite, "uniform"))
    mdm = load_config(suite.config, arm_overrides(suite, "mdm"))
    assert not deeper.model.is_looped and deeper.model.n_layers == 8
    assert uniform.model.loop_start == 0 and uniform.model.loop_end == 4 and layer_passes(uniform) == 8.0
    assert not mdm.model.is_looped and mdm.model.n_layers == 4
    seq = loop.data.seq_len
    expected_loop = sum(train_flops(loop.model, seq, s) for s in range(1, 9)) / 8
    ratio = train_flops(deeper.model, seq, 1) / expected_loop
    assert 0.9 < ratio < 1.15  # integer layers: within one layer of LoopMDM's expected cost
    for arm in KNOB_ARMS:
        load_config(suite.config, arm_overrides(suite, arm, 1e13))  # every knob arm is a valid config
    with pytest.raises(LoopMDMError, match="not allowed"):
        arm_overrides(suite, "bogus")


def test_every_suite_scale_and_arm_is_a_valid_config():
    # A scale's overrides reach `loopmdm train` only when a suite runs (minutes in); a typo there
    # must fail here instead.
    for suite in suites_mod.SUITES.values():
        for scale in suite.scales.values():
            for arm in suite.arms:
                load_config(suite.config, [*scale.overrides,
                                           *arm_overrides(suite, arm, scale.budget_flops, scale.overrides)])
    bpe = get_suite("shakespeare-bpe").scales
    cfg = load_config("experiments/shakespeare-char", list(bpe["cpu-4k"].overrides))
    assert (cfg.data.tokenizer, cfg.data.bpe_vocab_size) == ("bpe", 512)
    assert cfg.data.train_tokens == cfg.train.batch_size * cfg.data.seq_len  # one batch an epoch
    cfg16 = load_config("experiments/shakespeare-char", list(bpe["cpu-16k"].overrides))
    assert (cfg16.data.tokenizer, cfg16.data.train_tokens) == ("bpe", 8 * cfg.data.train_tokens)


def test_khop_gpu_scale_is_a_valid_task_past_the_mdms_depth():
    """The GPU k-hop scale loads (hops < nodes / 2: no backward shortcut and no elimination) and asks
    for more hops than the 4-layer MDM has layers (hop k needs k look-ups, about k + 1 attention rounds
    by chasing the chain; ~log2(k) + 1 by pointer doubling, so 8 hops is only just past 4 layers)."""
    suite = get_suite("khop")
    for arm in ("mdm", "loop"):
        cfg = load_config(suite.config, [*suite.scales["gpu"].overrides, *arm_overrides(suite, arm)])
        assert 2 * cfg.data.task_hops < cfg.data.task_size
    mdm = load_config(suite.config, [*suite.scales["gpu"].overrides, *arm_overrides(suite, "mdm")])
    assert (mdm.data.task_size, mdm.data.task_hops) == (18, 8) and mdm.data.task_hops > mdm.model.n_layers


def test_a_scale_that_changes_the_model_gets_arms_matched_to_its_own_model():
    # khop cpu-shallow cuts the stack to 2 layers; the deeper arm must match *that* LoopMDM's expected
    # per-step passes (2 + 1.5 = 3.5 -> 4 layers), not the base config's 4-layer one (7.5 -> 8)
    suite = get_suite("khop")
    scale = suite.scales["cpu-shallow"]
    arm = {a: load_config(suite.config, [*scale.overrides, *arm_overrides(suite, a, scale.budget_flops, scale.overrides)])
           for a in ("mdm", "loop", "deeper")}
    assert (arm["mdm"].model.n_layers, arm["mdm"].model.is_looped) == (2, False)
    assert (arm["loop"].model.loop_start, arm["loop"].model.loop_end, layer_passes(arm["loop"])) == (0, 1, 3.5)
    assert arm["deeper"].model.n_layers == 4 and not arm["deeper"].model.is_looped
    assert arm_overrides(suite, "deeper")[-1] == "model.n_layers=8"  # the base config's own deeper arm
    # two layers reach hop 3 at most in one call (tasks/khop.py): hop 4 is past the MDM's depth
    assert arm["mdm"].data.task_hops > arm["mdm"].model.n_layers + 1


def test_flops_to_match_interpolates_the_first_crossing():
    curve = [{"flops": 1.0, "val_nll": 3.0}, {"flops": 2.0, "val_nll": 2.0}, {"flops": 3.0, "val_nll": 1.0}]
    assert flops_to_match(2.5, 6.0, curve) == pytest.approx(6.0 / 1.5)
    assert flops_to_match(3.5, 6.0, curve) == pytest.approx(6.0)  # already below at the first point
    assert flops_to_match(0.5, 6.0, curve) is None


def _tiny_khop_config(tmp_path) -> Path:
    """A suite config small enough to sweep, train and evaluate in seconds."""
    config = tmp_path / "khop.yaml"
    config.write_text(f"""name: tiny-khop
model: {{n_layers: 3, d_model: 32, n_heads: 2, cond_dim: 16, loop_start: 1, loop_end: 2, max_train_loops: 3}}
data: {{source: task, task: khop, task_size: 5, task_hops: 2, task_examples: 600, cache_dir: {tmp_path / 'cache'}}}
train: {{batch_size: 16, max_steps: 0, max_flops: 1.0e9, warmup_steps: 2, ema: 0.9, log_every: 2, eval_every: 4,
        eval_batches: 1, checkpoint_every: 4, progress: false, device: cpu, precision: fp32}}
eval: {{batch_size: 16}}
""")
    return config


def _assert_close(a, b, rel=1e-6, path="") -> None:
    """Nested dicts and lists equal, their floats to a relative `rel`."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            _assert_close(a[key], b[key], rel, f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: {a} != {b}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, rel, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert b == pytest.approx(a, rel=rel, abs=1e-9), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a} != {b}"


def test_tiny_suite_runs_end_to_end_and_resumes(tmp_path, monkeypatch):
    config = _tiny_khop_config(tmp_path)
    suite = Suite("tiny", str(config), ("mdm", "loop"), "task", {"cpu": Scale(3e9, 0.5, (1e-3,), (0,), 8)},
                  orders=("oneshot",), loops=(1, 2))
    monkeypatch.setitem(suites_mod.SUITES, "tiny", suite)
    logs = []
    summary = run_suite("tiny", "cpu", out=str(tmp_path / "out"), jobs=2, log=logs.append)
    out = tmp_path / "out"
    assert set(summary["arms"]) == {"mdm", "loop"}
    assert set(summary["sweep_val_nll"]["loop"]) == {"0.001"}
    table = summary["tables"]["oneshot_acc"]
    assert set(table["loop"]) == {"1", "2"} and set(table["mdm"]) == {"1"}
    for arm in ("mdm", "loop"):
        train = json.loads((out / "runs" / f"{arm}-s0" / "train_summary.json").read_text())
        assert train["flops"] >= 3e9 and train["flops"] < 3e9 * 1.5  # trained to the FLOPs budget
    assert (out / "summary.md").read_text().startswith("# Suite `tiny`")
    assert set(summary["tables"]["val_nelbo_t[0.5,0.75)"]) == {"mdm", "loop"}  # NELBO by noise level
    assert (out / "oneshot_acc.png").stat().st_size > 1000
    # a second call finds every run trained and evaluated: nothing is retrained
    logs.clear()
    again = run_suite("tiny", "cpu", out=str(tmp_path / "out"), jobs=2, log=logs.append)
    assert not [m for m in logs if m.startswith(("train ", "eval "))]
    assert again["tables"] == summary["tables"]
    # evaluated one at a time instead of two at once (threads): the same numbers
    for arm in ("mdm", "loop"):
        (out / "runs" / f"{arm}-s0" / "eval.json").unlink()
    serial = run_suite("tiny", "cpu", out=str(tmp_path / "out"), jobs=1, log=lambda m: None)
    # (torch's thread count changes the order of float32 sums: equal to 1e-6, not bit for bit)
    _assert_close(serial["evaluations"], summary["evaluations"])
    _assert_close(serial["tables"], summary["tables"])
    # report only: with the loop arm's evaluation gone, it reports MDM alone and trains nothing
    (out / "runs" / "loop-s0" / "eval.json").unlink()
    logs.clear()
    partial = run_suite("tiny", "cpu", out=str(out), report_only=True, log=logs.append)
    assert not [m for m in logs if m.startswith(("train ", "eval "))]
    assert set(partial["arms"]) == {"mdm"} and partial["arms"]["mdm"]["lr"] == 1e-3
    assert "Report only" in (out / "summary.md").read_text()
    # --seeds: a one-seed screen of a suite whose scale has two final seeds trains seed 0 only
    two = Suite("tiny2", str(config), ("mdm",), "task", {"cpu": Scale(3e9, 0.5, (1e-3,), (0, 1), 8)},
                orders=("oneshot",), loops=(1,))
    monkeypatch.setitem(suites_mod.SUITES, "tiny2", two)
    screen = run_suite("tiny2", "cpu", out=str(out), seeds=[0], log=lambda m: None)
    assert screen["seeds"] == [0] and len(screen["arms"]["mdm"]["steps"]) == 1


def test_lrs_from_a_committed_report_adds_seeds_without_re_running_the_sweep(tmp_path, monkeypatch):
    """A fresh checkout has a suite's summary.json but not its runs (results/*/runs/ is not
    committed). --lrs-from trains the new seeds at the lrs that report recorded, runs no sweep,
    and carries the recorded sweep table (with an lr outside the grid) into the new report;
    a report of another scale or without the arm is refused in one line."""
    config = _tiny_khop_config(tmp_path)
    scale = Scale(3e9, 0.5, (1e-3, 3e-3), (0, 1), 8)
    # "long" keeps cpu's sweep (6e9 x 0.25 = 3e9 x 0.5, the same lrs): its recorded lrs hold there;
    # "other" sweeps at another budget: they do not
    suite = Suite("tiny", str(config), ("mdm", "loop"), "task",
                  {"cpu": scale, "long": Scale(6e9, 0.25, (1e-3, 3e-3), (0,), 8), "other": Scale(6e9, 0.5, (1e-3, 3e-3), (0,), 8)},
                  orders=("oneshot",), loops=(1, 2))
    monkeypatch.setitem(suites_mod.SUITES, "tiny", suite)
    committed = tmp_path / "committed"
    committed.mkdir()
    recorded = {"suite": "tiny", "scale": "cpu", "dry_run": False,
                "arms": {"mdm": {"lr": 3e-3}, "loop": {"lr": 1e-3}},
                "sweep_val_nll_per_seed": {"mdm": {"0.001": {"0": 2.5}, "0.003": {"0": 2.0}, "0.009": {"0": None}},
                                           "loop": {"0.001": {"0": 2.2}, "0.003": {"0": 2.4}}}}
    (committed / "summary.json").write_text(json.dumps(recorded))
    logs = []
    summary = run_suite("tiny", "cpu", out=str(tmp_path / "out"), seeds=[1], lrs_from=str(committed), log=logs.append)
    runs = sorted(p.name for p in (tmp_path / "out" / "runs").iterdir() if p.is_dir())
    assert runs == ["loop-s1", "mdm-s1"]  # no sweep run
    assert {arm: info["lr"] for arm, info in summary["arms"].items()} == {"mdm": 3e-3, "loop": 1e-3}
    for arm, lr in (("mdm", 3e-3), ("loop", 1e-3)):
        assert f"train {arm}-s1 (lr {lr:g}, seed 1," in " ".join(logs)
    assert summary["sweep_val_nll"]["mdm"] == {"0.001": 2.5, "0.003": 2.0, "0.009": None}
    assert summary["lrs_from"] == str(committed)
    md = (tmp_path / "out" / "summary.md").read_text()
    assert f"as recorded in `{committed}`" in md and "extended to ['0.009']" in md
    with pytest.raises(LoopMDMError, match="reports suite 'tiny' at scale 'cpu'.*this is suite 'tiny' at scale 'other'"):
        run_suite("tiny", "other", out=str(tmp_path / "o2"), lrs_from=str(committed), log=lambda m: None)
    from loopmdm.experiments.runner import recorded_sweep

    assert recorded_sweep(committed, suite, "long")[0] == {"mdm": 3e-3, "loop": 1e-3}
    del recorded["arms"]["loop"]
    (committed / "summary.json").write_text(json.dumps(recorded))
    with pytest.raises(LoopMDMError, match="has no lr for arm 'loop' \\(it has: mdm\\)"):
        run_suite("tiny", "cpu", out=str(tmp_path / "o3"), lrs_from=str(committed), log=lambda m: None)
    with pytest.raises(LoopMDMError, match="holds no summary.json"):
        run_suite("tiny", "cpu", out=str(tmp_path / "o4"), lrs_from=str(tmp_path), log=lambda m: None)


def test_knob_arms_train_at_the_loop_arms_lr_with_one_seed_and_no_sweep_of_their_own(tmp_path):
    from dataclasses import replace

    from loopmdm.experiments.runner import plan

    suite = replace(get_suite("sudoku"), arms=("mdm", "loop-lr", "loop-trunc"))
    scale = Scale(1e12, 0.2, (1e-3, 3e-3), (0, 1), 8)
    sweep, _ = plan(suite, scale, tmp_path, None)
    assert sorted({s.arm for s in sweep}) == ["loop", "mdm"]  # loop swept for the knobs, not asked for itself
    _, final = plan(suite, scale, tmp_path, {"mdm": 1e-3, "loop": 3e-3})
    assert [(s.name, s.lr) for s in final] == [("mdm-s0", 1e-3), ("mdm-s1", 1e-3),
                                              ("loop-lr-s0", 3e-3), ("loop-trunc-s0", 3e-3)]
    assert "model.grad_loops=2" in final[-1].overrides
    _, final = plan(suite, replace(scale, knob_seeds=(0, 1)), tmp_path, {"mdm": 1e-3, "loop": 3e-3})
    assert [s.name for s in final] == ["mdm-s0", "mdm-s1", "loop-lr-s0", "loop-lr-s1", "loop-trunc-s0", "loop-trunc-s1"]


def test_knob_seeds_without_a_knob_arm_is_a_one_line_error(tmp_path):
    with pytest.raises(LoopMDMError, match="--knob-seeds 0,1 but no knob arm among the arms mdm,loop"):
        run_suite("sudoku", "cpu", out=str(tmp_path / "o"), arms=["mdm", "loop"], knob_seeds=[0, 1], log=lambda m: None)
    assert not (tmp_path / "o").exists()  # checked before anything is written


def test_an_lr_optimum_at_the_grids_edge_gets_more_sweep_runs_up_to_two_steps_out(tmp_path):
    from dataclasses import replace

    from loopmdm.experiments.runner import edge_extensions, plan

    suite = replace(get_suite("sudoku"), arms=("mdm", "loop", "deeper"))
    scale = Scale(1e12, 0.5, (1e-3, 3e-3, 1e-2), (0,), 8)
    sweep, _ = plan(suite, scale, tmp_path, None)
    nll = {("mdm", 1e-3): 1.0, ("mdm", 3e-3): 2.0, ("mdm", 1e-2): 3.0,  # best at the low edge
           ("loop", 1e-3): 3.0, ("loop", 3e-3): 2.0, ("loop", 1e-2): 1.0,  # best at the high edge
           ("deeper", 1e-3): 2.0, ("deeper", 3e-3): 1.0, ("deeper", 1e-2): 3.0}  # inside: nothing to add
    for spec in sweep:
        spec.out_dir.mkdir(parents=True)
        (spec.out_dir / "train_summary.json").write_text(json.dumps({"val_nll": nll[(spec.arm, spec.lr)]}))
    extra = edge_extensions(suite, scale, sweep, tmp_path)
    assert sorted((s.arm, s.lr) for s in extra) == [("loop", 0.03), ("mdm", 0.000333)]
    for spec in extra:  # the extension is better still: one more step out, then no further
        spec.out_dir.mkdir(parents=True)
        (spec.out_dir / "train_summary.json").write_text(json.dumps({"val_nll": 0.5}))
    extra2 = edge_extensions(suite, scale, sweep + extra, tmp_path)
    assert sorted((s.arm, s.lr) for s in extra2) == [("loop", 0.09), ("mdm", 0.000111)]
    for spec in extra2:
        spec.out_dir.mkdir(parents=True)
        (spec.out_dir / "train_summary.json").write_text(json.dumps({"val_nll": 0.25}))
    assert edge_extensions(suite, scale, sweep + extra + extra2, tmp_path) == []  # MAX_EDGE_STEPS reached


def test_a_two_seed_sweep_picks_the_lr_with_the_lowest_mean_not_seed_zeros_luck(tmp_path):
    from dataclasses import replace

    from loopmdm.experiments.runner import edge_extensions, pick_best_lr, plan

    suite = replace(get_suite("sudoku"), arms=("mdm", "loop"))
    scale = Scale(1e12, 0.5, (5e-4, 1e-3, 2e-3), (0, 1, 2), 8, sweep_seeds=(0, 1))
    sweep, _ = plan(suite, scale, tmp_path, None)
    names = sorted(s.name for s in sweep if s.arm == "loop")
    # seed 0 keeps the one-seed sweep's folder names, so a sweep run before seeds existed is reused
    assert names == ["sweep-loop-lr1e-3", "sweep-loop-lr1e-3-s1", "sweep-loop-lr2e-3", "sweep-loop-lr2e-3-s1",
                     "sweep-loop-lr5e-4", "sweep-loop-lr5e-4-s1"]
    assert all(s.seed == (1 if s.name.endswith("-s1") else 0) for s in sweep)
    # Sudoku's loop at 2e-3: best on seed 0, stuck on seed 1 (results/sudoku-scarce-cpu-longer); mdm's
    # 1e-3 diverges on seed 1 (NaN): it must lose, not poison the comparison
    nll = {("loop", 5e-4, 0): 0.78, ("loop", 5e-4, 1): 0.80, ("loop", 1e-3, 0): 0.70, ("loop", 1e-3, 1): 0.72,
           ("loop", 2e-3, 0): 0.66, ("loop", 2e-3, 1): 1.30,
           ("mdm", 5e-4, 0): 0.60, ("mdm", 5e-4, 1): 0.62, ("mdm", 1e-3, 0): 0.55, ("mdm", 1e-3, 1): float("nan"),
           ("mdm", 2e-3, 0): 0.70, ("mdm", 2e-3, 1): 0.71}
    for spec in sweep:
        spec.out_dir.mkdir(parents=True)
        (spec.out_dir / "train_summary.json").write_text(json.dumps({"val_nll": nll[(spec.arm, spec.lr, spec.seed)]}))
    assert pick_best_lr([s for s in sweep if s.seed == 0]) == {"loop": 2e-3, "mdm": 1e-3}  # seed 0 alone
    assert pick_best_lr(sweep) == {"loop": 1e-3, "mdm": 5e-4}
    # an lr run at one seed only (a half-done sweep under --report-only) is not compared with two-seed means
    assert pick_best_lr([s for s in sweep if not (s.arm == "loop" and s.lr == 1e-3 and s.seed == 1)])["loop"] == 5e-4
    # mdm's best (5e-4) is at the grid's low edge: the extension runs at both sweep seeds
    assert sorted((s.arm, s.lr, s.seed) for s in edge_extensions(suite, scale, sweep, tmp_path)) == \
        [("mdm", 0.00025, 0), ("mdm", 0.00025, 1)]


def _report_of_a_two_seed_sweep(tmp_path, runs: tuple) -> dict:
    """write_report over sweep runs (lr, seed, val NELBO) of one `mdm` arm, sweep seeds 0 and 1."""
    from dataclasses import replace

    from loopmdm.experiments.report import write_report
    from loopmdm.experiments.runner import RunSpec

    sweep = []
    for lr, seed, v in runs:
        run = tmp_path / f"sweep-mdm-{lr}-{seed}"
        run.mkdir()
        (run / "train_summary.json").write_text(json.dumps({"val_nll": v}))
        sweep.append(RunSpec(run.name, "mdm", lr, seed, 1e9, run))
    suite = replace(get_suite("sudoku"), arms=("mdm",), orders=("raster",), loops=(1,))
    ev = _ev("mdm", 0, {1: 1.0}, orders={"raster": _solve_records({1: 0.5})})
    lrs = tuple(sorted({lr for lr, _, _ in runs}))
    return write_report(suite, "cpu", Scale(1e9, 0.5, lrs, (0,), 8, sweep_seeds=(0, 1)), tmp_path,
                        sweep, [], {"mdm-s0": ev}, wall_seconds=None, dry_run=False)


def test_the_report_shows_each_sweep_seed_beside_the_mean(tmp_path):
    summary = _report_of_a_two_seed_sweep(tmp_path, ((1e-3, 0, 1.0), (1e-3, 1, 1.4), (2e-3, 0, 0.9), (2e-3, 1, 2.0)))
    assert summary["sweep_seeds"] == [0, 1]
    assert summary["sweep_val_nll"]["mdm"] == {"0.001": pytest.approx(1.2), "0.002": pytest.approx(1.45)}
    assert summary["sweep_val_nll_per_seed"]["mdm"]["0.002"] == {"0": 0.9, "1": 2.0}
    md = (tmp_path / "summary.md").read_text()
    assert "| mdm | 1.2000 (1.000, 1.400) | 1.4500 (0.900, 2.000) |" in md
    assert "(seeds 0, 1: the lowest mean picks)" in md


def test_a_diverged_sweep_run_is_null_in_the_summary_not_a_crash(tmp_path):
    summary = _report_of_a_two_seed_sweep(tmp_path, ((1e-3, 0, 1.0), (1e-3, 1, 1.2), (4e-3, 0, 0.8),
                                                     (4e-3, 1, float("nan"))))
    assert summary["sweep_val_nll"]["mdm"]["0.004"] is None  # strict JSON: no inf, no NaN
    assert summary["sweep_val_nll_per_seed"]["mdm"]["0.004"] == {"0": 0.8, "1": None}
    assert json.loads((tmp_path / "summary.json").read_text())["sweep_val_nll"]["mdm"]["0.001"] == pytest.approx(1.1)


def test_a_finished_run_at_another_lr_than_planned_is_refused_not_reused(tmp_path):
    from loopmdm.experiments.runner import RunSpec, train_runs

    run = tmp_path / "mdm-s0"
    run.mkdir()
    (run / "train_summary.json").write_text("{}")
    (run / "config.yaml").write_text("train:\n  lr: 0.001\n")
    spec = RunSpec("mdm-s0", "mdm", 3e-4, 0, 1e12, run)
    with pytest.raises(LoopMDMError, match="trained at lr 0.001, but the sweep now picks 0.0003"):
        train_runs(get_suite("sudoku"), [spec], 1, print)
    train_runs(get_suite("sudoku"), [RunSpec("mdm-s0", "mdm", 1e-3, 0, 1e12, run)], 1, print)  # same lr: done


def test_finetune_suite_starts_each_arm_from_its_pretrained_run(tmp_path, monkeypatch):
    """A fine-tuning suite (init_of): every run starts from the same arm and seed of the
    pretraining suite, on generated pairs, and reports exact match per S and difficulty."""
    from tests.conftest import bbc_glob

    config = tmp_path / "lm.yaml"
    config.write_text(f"""name: tiny-lm
model: {{n_layers: 3, d_model: 32, n_heads: 2, cond_dim: 16, loop_start: 1, loop_end: 2, max_train_loops: 3}}
data: {{source: text, paths: ['{bbc_glob()}'], bpe_vocab_size: 300, seq_len: 32, val_fraction: 0.2,
       cache_dir: {tmp_path / 'cache'}}}
train: {{batch_size: 8, max_steps: 0, max_flops: 1.0e9, warmup_steps: 2, ema: 0.9, log_every: 2, eval_every: 4,
        eval_batches: 1, checkpoint_every: 4, progress: false, device: cpu, precision: fp32}}
eval: {{batch_size: 8, num_batches: 1}}
""")
    pretrain = Suite("tinylm", str(config), ("mdm", "loop"), "lm", {"cpu": Scale(1e9, 0.5, (1e-3,), (0,), 1)},
                     loops=(1, 2))
    finetune = Suite("tinyft", str(config), ("mdm", "loop"), "task",
                     {"cpu": Scale(1e9, 0.5, (1e-3,), (0,), 8, ("data.seq_len=64",))},
                     orders=("confidence",), loops=(1, 2), init_of="tinylm",
                     pairs="rg:chain_sum:min_terms=2,max_terms=3,min_digits=1,max_digits=1", pairs_num=300)
    monkeypatch.setitem(suites_mod.SUITES, "tinylm", pretrain)
    monkeypatch.setitem(suites_mod.SUITES, "tinyft", finetune)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoopMDMError, match="run `loopmdm experiment tinylm`"):
        run_suite("tinyft", "cpu", jobs=2, log=lambda m: None)
    run_suite("tinylm", "cpu", jobs=2, log=lambda m: None)
    summary = run_suite("tinyft", "cpu", jobs=2, log=lambda m: None)
    out = tmp_path / "results" / "tinyft-cpu"
    config_text = (out / "runs" / "loop-s0" / "config.yaml").read_text()
    assert "init_from: " + str(tmp_path / "results" / "tinylm-cpu" / "runs" / "loop-s0") in config_text
    assert "source: pairs" in config_text
    assert set(summary["tables"]["confidence_exact"]["loop"]) == {"1", "2"}
    by_diff = summary["tables"]["confidence_exact_by_difficulty"]
    assert set(next(iter(by_diff.values()))) <= {"2", "3"}
    assert "exact match by difficulty" in (out / "summary.md").read_text()


def _ev(arm, seed, nll, curve=None, flops=6.0, orders=None):
    """A synthetic evaluation (experiments/evaluate.py's shape): NELBO per S, optionally solve records."""
    ev = {"arm": arm, "seed": seed, "lr": 1e-3, "step": 10, "flops": flops, "train_time": 60.0, "params": 100,
          "val_curve": curve or [{"step": 10, "flops": flops, "val_nll": 9.0}],
          "nelbo": [{"loops": s, "nll": v} for s, v in nll.items()]}
    if orders is not None:
        ev["orders"] = orders
    return ev


def _solve_records(solved: dict, n: int = 10) -> list[dict]:
    return [{"loops": s, "solved": v, "cell_acc": v, "nfe": 1,
             "by_difficulty": {"1": {"n": n, "solved": v, "cell_acc": v}}} for s, v in solved.items()]


def _report(tmp_path, suite, evaluations):
    from loopmdm.experiments.report import write_report

    summary = write_report(suite, "cpu", suite.scales["cpu"], tmp_path, [], [], evaluations, 1.0, dry_run=False)
    return summary, (tmp_path / "summary.md").read_text()


def test_report_tables_never_mix_seeds_across_s(tmp_path):
    """Issue 16, fault 1: LoopMDM seed 1 evaluated at S = 1 and 8 only, seed 0 at every S. Every
    cell of every table is seed 0's alone (not a two-seed mean at S = 1 and 8 beside seed 0 at the
    rest), the table says so, seed 1 stays visible per seed, and the by-difficulty table pools seed 0."""
    from dataclasses import replace

    suite = replace(get_suite("sudoku"), arms=("mdm", "loop"), orders=("raster",), loops=(1, 2, 4, 8))
    loop0 = {1: 0.09, 2: 0.22, 4: 0.20, 8: 0.18}
    loop1 = {1: 0.50, 8: 0.90}
    evaluations = {
        "mdm-s0": _ev("mdm", 0, {1: 1.0}, orders={"raster": _solve_records({1: 0.40})}),
        "mdm-s1": _ev("mdm", 1, {1: 2.0}, orders={"raster": _solve_records({1: 0.60})}),
        "loop-s0": _ev("loop", 0, {s: 1.0 + v for s, v in loop0.items()}, orders={"raster": _solve_records(loop0)}),
        "loop-s1": _ev("loop", 1, {s: 1.0 + v for s, v in loop1.items()}, orders={"raster": _solve_records(loop1)}),
    }
    summary, md = _report(tmp_path, suite, evaluations)
    solved = summary["tables"]["raster_solved"]
    assert {s: v[0] for s, v in solved["loop"].items()} == {"1": 0.09, "2": 0.22, "4": 0.20, "8": 0.18}
    assert solved["mdm"]["1"] == (0.40, None)  # MDM too: seed 0 alone, the seeds every arm has
    assert summary["tables"]["val_nelbo"]["loop"]["8"][0] == pytest.approx(1.18)
    seeds = summary["seed_tables"]["raster_solved"]
    assert seeds["seeds"] == [0] and seeds["left_out"] == {"loop": {"1": [2, 4]}, "mdm": {"1": []}}
    assert seeds["per_seed"]["loop"]["1"] == {"1": 0.50, "8": 0.90}  # still shown, per seed
    assert seeds["paired_vs_s1"]["loop"]["2"] == {"mean": pytest.approx(0.13), "se": None, "n": 1}
    assert "seeds [0] in every cell; left out: mdm seed 1 (another arm lacks it); loop seed 1 (no value at S = 2, 4)" in md
    assert "| loop s1 (left out) | 0.500 |  |  | 0.900 |" in md
    by_diff = summary["tables"]["raster_solved_by_difficulty"]
    assert by_diff["loop S=1"]["1"] == 0.09 and "1 (n=10)" in md  # seed 0's 10 boards, not 20 pooled


def test_report_cells_and_paired_differences_equal_the_hand_computed_ones(tmp_path):
    """Three complete seeds: a cell is the mean ± half the spread, the paired S - (S = 1) is the
    mean ± sample std / sqrt(n) of the within-seed differences; FLOPs-to-match is MDM's FLOPs over
    the interpolated FLOPs at which the arm's curve first reaches MDM's final NELBO."""
    from dataclasses import replace

    suite = replace(get_suite("lm"), arms=("mdm", "loop"), loops=(1, 2))
    curve = [{"step": 1, "flops": 1.0, "val_nll": 3.0}, {"step": 2, "flops": 2.0, "val_nll": 2.0},
             {"step": 3, "flops": 3.0, "val_nll": 1.0}]
    mdm_curve = [{"step": 1, "flops": 6.0, "val_nll": 2.5}]
    evaluations = {f"mdm-s{k}": _ev("mdm", k, {1: 3.0 + k}, curve=mdm_curve) for k in range(3)}
    # loop at S = 1: 2.0, 2.2, 2.6; at S = 2: 1.9, 2.0, 2.3 -> differences -0.1, -0.2, -0.3
    for k, (a, b) in enumerate([(2.0, 1.9), (2.2, 2.0), (2.6, 2.3)]):
        evaluations[f"loop-s{k}"] = _ev("loop", k, {1: a, 2: b}, curve=curve, flops=3.0)
    summary, md = _report(tmp_path, suite, evaluations)
    table = summary["tables"]["val_nelbo"]
    assert table["loop"]["1"][0] == pytest.approx(6.8 / 3) and table["loop"]["1"][1] == pytest.approx(0.3)
    assert table["mdm"]["1"][0] == pytest.approx(4.0) and table["mdm"]["1"][1] == pytest.approx(1.0)
    paired = summary["seed_tables"]["val_nelbo"]["paired_vs_s1"]["loop"]["2"]
    assert paired["mean"] == pytest.approx(-0.2) and paired["se"] == pytest.approx(0.1 / 3 ** 0.5) and paired["n"] == 3
    assert "| loop | 2.267 ± 0.300 | 2.067 ± 0.200 |" in md
    assert "| loop, [0, 1, 2] | -0.200 ± 0.058 |" in md  # the paired table: S = 2 vs S = 1
    assert "seeds [0, 1, 2] in every cell; mean" in md
    assert summary["flops_to_match"] == {f"loop-s{k}": pytest.approx(6.0 / 1.5) for k in range(3)}
    assert "- loop-s0: 4.00×" in md


def test_a_data_scarce_report_reads_flops_to_match_at_the_best_not_the_overfit_final(tmp_path):
    """Past its best the MDM's final NELBO is high, so 'first reaches MDM's final NELBO' would
    credit the loop with a large factor (49x on the 4k-long suite). A suite that selects on
    validation reports FLOPs-to-match at the best only (regime_report.py), both ways."""
    from dataclasses import replace

    suite = replace(get_suite("shakespeare-char"), arms=("mdm", "loop"), loops=(1, 2))
    mdm_curve = [{"step": 1, "flops": 1.0, "epoch": 1.0, "val_nll": 2.0}, {"step": 2, "flops": 2.0, "epoch": 2.0, "val_nll": 3.0}]
    loop_curve = [{"step": 1, "flops": 1.0, "epoch": 1.0, "val_nll": 2.5}, {"step": 2, "flops": 2.0, "epoch": 2.0, "val_nll": 2.4}]
    evaluations = {}
    for k in range(3):
        for arm, curve, best in (("mdm", mdm_curve, 2.0), ("loop", loop_curve, 2.4)):
            ev = _ev(arm, k, {1: 2.0}, curve=curve, flops=2.0)
            ev.update(epochs=2.0, best={"step": 1 if arm == "mdm" else 2, "val_nll": best, "epoch": 1.0},
                      test_nelbo=[{"loops": s, "nll": best, "sequences": 8, "tokens": 64} for s in (1, 2)])
            evaluations[f"{arm}-s{k}"] = ev
    summary, md = _report(tmp_path, suite, evaluations)
    assert "flops_to_match" not in summary and "MDM's final NELBO" not in md
    ratios = summary["regime"]["flops_to_match"]
    assert ratios["mdm -> loop"] == [None] * 3  # the loop never reaches the MDM's best 2.0


def test_a_task_report_without_a_test_split_reads_flops_to_match_at_the_best_both_ways(tmp_path):
    """A task suite (khop cpu-deep-long) has no test split, so no regime section: its report still
    gives FLOPs-to-match in both directions at each reference's best validation NELBO, per seed,
    over the seeds every arm has (seed 1 has no MDM run: left out)."""
    from dataclasses import replace

    suite = replace(get_suite("khop"), arms=("mdm", "loop"), orders=("oneshot",), loops=(1,))
    mdm_curve = [{"step": 1, "flops": 1.0, "val_nll": 2.0}, {"step": 2, "flops": 2.0, "val_nll": 1.0}]
    loop_curve = [{"step": 1, "flops": 2.0, "val_nll": 3.0}, {"step": 2, "flops": 4.0, "val_nll": 1.5}]
    records = {"oneshot": [{"loops": 1, "acc": 0.5, "per_hop": [1.0, 0.0], "nfe": 1}]}
    evaluations = {"mdm-s0": _ev("mdm", 0, {1: 1.0}, curve=mdm_curve, flops=2.0, orders=records),
                   "loop-s0": _ev("loop", 0, {1: 1.5}, curve=loop_curve, flops=4.0, orders=records),
                   "loop-s1": _ev("loop", 1, {1: 1.5}, curve=loop_curve, flops=4.0, orders=records)}
    summary, md = _report(tmp_path, suite, evaluations)
    # loop's best 1.5 at 4.0 FLOPs; the MDM first reaches 1.5 at 1.5 (interpolated): 4.0 / 1.5
    assert summary["flops_to_match"] == {"mdm -> loop": [None], "loop -> mdm": [pytest.approx(4.0 / 1.5)]}
    assert "| loop → mdm | 2.67× |" in md and "| direction | seed 0 |" in md


def test_a_task_report_without_a_test_split_gives_mask_attention_for_the_mdm_beside_the_loop(tmp_path):
    """Issue 16 item 4 on k-hop: a task suite without a test split (no regime section) still
    reports mask->mask attention per layer, the MDM's beside LoopMDM's per iteration, as the mean
    over the seeds every arm has (loop seed 1 has no MDM partner: left out of the mean)."""
    from dataclasses import replace

    suite = replace(get_suite("khop"), arms=("mdm", "loop"), orders=("oneshot",), loops=(1,))
    curve = [{"step": 1, "flops": 1.0, "val_nll": 2.0}]
    records = {"oneshot": [{"loops": 1, "acc": 0.5, "per_hop": [1.0, 0.0], "nfe": 1}]}

    def att(layers, values, frac):
        return {"layers": layers, "mask_to_mask": values, "masked_key_frac": frac, "num_loops": 2}

    evaluations = {"mdm-s0": _ev("mdm", 0, {1: 1.0}, curve=curve, orders=records),
                   "loop-s0": _ev("loop", 0, {1: 1.5}, curve=curve, orders=records),
                   "loop-s1": _ev("loop", 1, {1: 1.5}, curve=curve, orders=records)}
    evaluations["mdm-s0"]["mask_attention"] = att(["prelude.0", "coda.0"], [0.2, 0.4], 0.1)
    evaluations["loop-s0"]["mask_attention"] = att(["loop.0@k1", "loop.0@k2", "coda.0"], [0.3, 0.5, 0.6], 0.1)
    evaluations["loop-s1"]["mask_attention"] = att(["loop.0@k1", "loop.0@k2", "coda.0"], [0.9, 0.9, 0.9], 0.1)
    summary, md = _report(tmp_path, suite, evaluations)
    assert summary["attention"]["loop"]["mask_to_mask"] == pytest.approx([0.3, 0.5, 0.6])  # seed 0 alone
    assert summary["attention"]["mdm"]["layers"] == ["prelude.0", "coda.0"]
    assert "- mdm (masked-key fraction 0.100): prelude.0 0.200, coda.0 0.400" in md
    assert "- loop (masked-key fraction 0.100): loop.0@k1 0.300, loop.0@k2 0.500, coda.0 0.600" in md
    assert "mean over seeds [0]" in md


def test_a_table_with_no_seed_in_every_arm_shows_seeds_only_and_draws_nothing_wrong(tmp_path):
    """MDM ran seed 0 only, LoopMDM seed 1 only: no seed is common, so no mean is reported
    (a mean of different seeds per arm would be the same mix across rows); per-seed values and
    LoopMDM's paired S = 2 vs S = 1 (within its own seed) stay."""
    from loopmdm.experiments.tables import render_seed_table, seed_table

    evaluations = {"mdm-s0": _ev("mdm", 0, {1: 1.0}), "loop-s1": _ev("loop", 1, {1: 2.0, 2: 1.5})}
    st = seed_table(evaluations, ["mdm", "loop"], lambda ev: [(r["loops"], r["nll"]) for r in ev["nelbo"]])
    assert st.seeds == [] and st.means == {"mdm": {}, "loop": {}}
    assert st.paired == {"loop": {2: (-0.5, None, 1)}}  # within one arm: over its own seed
    md = "\n".join(render_seed_table("NELBO", st, [1, 2]))
    assert "no seed has a value in every cell of every arm" in md and "| loop s1 | 2.000 | 1.500 |" in md
    assert "| loop, [1] | -0.500 |" in md
    from loopmdm.experiments.report import _plot

    _plot(tmp_path / "per_seed.png", "NELBO", "nats", st, [1, 2])  # no common seed: each seed drawn
    assert (tmp_path / "per_seed.png").stat().st_size > 1000


def test_sweep_folders_name_the_lr_they_train_and_resume_one_digit_names(tmp_path):
    from loopmdm.experiments.runner import _lr_name, _run_dir

    assert [_lr_name(lr) for lr in (1e-3, 2.5e-4, 5e-4, 9e-5, 3.33e-4)] == ["1e-3", "2.5e-4", "5e-4", "9e-5", "3.33e-4"]
    runs = tmp_path / "runs"
    assert _run_dir(runs, "sweep-mdm-lr", 2.5e-4).name == "sweep-mdm-lr2.5e-4"
    old = runs / "sweep-mdm-lr3e-4"  # what an earlier version named lr 2.5e-4
    old.mkdir(parents=True)
    (old / "config.yaml").write_text("train:\n  lr: 0.00025\n")
    assert _run_dir(runs, "sweep-mdm-lr", 2.5e-4) == old
    assert _run_dir(runs, "sweep-mdm-lr", 3e-4).name == "sweep-mdm-lr3e-4"  # exact: the new name is the same
    (old / "config.yaml").write_text("train:\n  lr: 0.0003\n")
    assert _run_dir(runs, "sweep-mdm-lr", 2.5e-4).name == "sweep-mdm-lr2.5e-4"  # trained at another lr


def test_extending_a_run_equals_training_it_longer(tmp_path, monkeypatch):
    """--extend-from: the same suite at 2x the budget, continued from the 1x runs, gives the
    same train/val records as training at 2x from scratch (FLOPs-limited runs: constant lr)."""
    config = _tiny_khop_config(tmp_path)
    suite = Suite("tiny", str(config), ("loop",), "task",
                  {"short": Scale(1e9, 0.5, (1e-3,), (0,), 8), "long": Scale(2e9, 0.5, (1e-3,), (0,), 8)},
                  orders=("oneshot",), loops=(1, 2))
    monkeypatch.setitem(suites_mod.SUITES, "tiny", suite)
    run_suite("tiny", "short", out=str(tmp_path / "short"), jobs=2, log=lambda m: None)
    logs = []
    run_suite("tiny", "long", out=str(tmp_path / "extended"), jobs=2, extend_from=str(tmp_path / "short"),
              log=logs.append)
    assert sum(m.startswith("extend ") for m in logs) == 2  # the sweep run and the final run
    run_suite("tiny", "long", out=str(tmp_path / "fresh"), jobs=2, log=lambda m: None)
    from tests.test_training import train_records

    from loopmdm import checkpoint as ckpt

    for name in ("sweep-loop-lr1e-3", "loop-s0"):
        short = train_records(tmp_path / "short" / "runs" / name)
        extended = train_records(tmp_path / "extended" / "runs" / name)
        fresh = train_records(tmp_path / "fresh" / "runs" / name)
        # the old budget's last step is logged and validated once more, so the next train record
        # averages its loss over a shorter window; every other record is the same
        end = short[-1]["step"]
        by_key = lambda records: {(r["kind"], r["step"]): r for r in records}  # noqa: E731
        ext, new = by_key(extended), by_key(fresh)
        window = lambda r: {k: v for k, v in r.items() if k not in ("loss", "loops_mean")}  # noqa: E731
        after = min(step for kind, step in new if kind == "train" and step > end)
        assert all(ext[key] == record if key != ("train", after) else window(ext[key]) == window(record)
                   for key, record in new.items())
        assert {step for _, step in set(ext) - set(new)} <= {end}
        assert len(fresh) > len(short) and fresh[-1] == extended[-1]
        a = ckpt.load_weights(ckpt.checkpoint_path(tmp_path / "extended" / "runs" / name), use_ema=False)
        b = ckpt.load_weights(ckpt.checkpoint_path(tmp_path / "fresh" / "runs" / name), use_ema=False)
        assert all(torch.equal(a[k], b[k]) for k in a)  # the same weights, bit for bit
    # a source run trained past this plan's budget is refused in one line, nothing copied
    with pytest.raises(LoopMDMError, match="only FLOPs-limited runs at most"):
        run_suite("tiny", "short", out=str(tmp_path / "back"), extend_from=str(tmp_path / "fresh"), log=lambda m: None)
