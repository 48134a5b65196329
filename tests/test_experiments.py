"""Experiment suites: arm construction (FLOPs matching), the FLOPs-to-match reading, and a
whole (tiny) suite run end to end, then resumed without retraining."""

import json

import pytest

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


def test_khop_gpu_scale_is_a_valid_task_past_the_mdms_depth():
    """The GPU k-hop scale loads (hops <= nodes // 2: no backward shortcut) and asks for more
    hops than the 4-layer MDM has layers (hop k needs k look-ups, about k + 1 attention rounds)."""
    suite = get_suite("khop")
    for arm in ("mdm", "loop"):
        cfg = load_config(suite.config, [*suite.scales["gpu"].overrides, *arm_overrides(suite, arm)])
        assert cfg.data.task_hops <= cfg.data.task_size // 2
    mdm = load_config(suite.config, [*suite.scales["gpu"].overrides, *arm_overrides(suite, "mdm")])
    assert (mdm.data.task_size, mdm.data.task_hops) == (16, 8) and mdm.data.task_hops > mdm.model.n_layers


def test_flops_to_match_interpolates_the_first_crossing():
    curve = [{"flops": 1.0, "val_nll": 3.0}, {"flops": 2.0, "val_nll": 2.0}, {"flops": 3.0, "val_nll": 1.0}]
    assert flops_to_match(2.5, 6.0, curve) == pytest.approx(6.0 / 1.5)
    assert flops_to_match(3.5, 6.0, curve) == pytest.approx(6.0)  # already below at the first point
    assert flops_to_match(0.5, 6.0, curve) is None


def test_tiny_suite_runs_end_to_end_and_resumes(tmp_path, monkeypatch):
    config = tmp_path / "khop.yaml"
    config.write_text(f"""name: tiny-khop
model: {{n_layers: 3, d_model: 32, n_heads: 2, cond_dim: 16, loop_start: 1, loop_end: 2, max_train_loops: 3}}
data: {{source: task, task: khop, task_size: 5, task_hops: 2, task_examples: 600, cache_dir: {tmp_path / 'cache'}}}
train: {{batch_size: 16, max_steps: 0, max_flops: 1.0e9, warmup_steps: 2, ema: 0.9, log_every: 2, eval_every: 4,
        eval_batches: 1, checkpoint_every: 4, progress: false, device: cpu, precision: fp32}}
eval: {{batch_size: 16}}
""")
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


def test_an_lr_optimum_at_the_grids_edge_gets_one_more_sweep_run(tmp_path):
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
    for spec in extra:  # the extension is better still: it is taken, and not extended again
        spec.out_dir.mkdir(parents=True)
        (spec.out_dir / "train_summary.json").write_text(json.dumps({"val_nll": 0.5}))
    assert edge_extensions(suite, scale, sweep + extra, tmp_path) == []


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
