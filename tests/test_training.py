"""Training: loop-count draws, LR, checkpoints, and exact resume after a crash."""

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from loopmdm.config import TrainConfig
from loopmdm.errors import LoopMDMError
from loopmdm.runs import load_run
from loopmdm import checkpoint as ckpt
from loopmdm.training.loops import train_num_loops
from loopmdm.training.lr import learning_rate
from loopmdm.training.run import train
from loopmdm.training.trainer import Trainer


def test_training_loop_counts_identical_across_ranks_and_uniform():
    draws = [[train_num_loops(step, seed=3, max_train_loops=12) for step in range(3000)] for _rank in range(4)]
    assert all(d == draws[0] for d in draws)  # every simulated rank draws the same S
    counts = np.bincount(draws[0], minlength=13)[1:]
    assert counts.min() > 0 and set(draws[0]) == set(range(1, 13))
    assert abs(counts / 3000 - 1 / 12).max() < 0.03  # uniform on {1..12}
    assert draws[0] != [train_num_loops(step, seed=4, max_train_loops=12) for step in range(3000)]


def test_learning_rate_warmup_constant_and_cosine():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, lr_schedule="constant")
    assert learning_rate(0, cfg) == pytest.approx(0.1)
    assert learning_rate(9, cfg) == pytest.approx(1.0)
    assert learning_rate(500, cfg) == 1.0
    cfg = TrainConfig(lr=1.0, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    assert learning_rate(10, cfg, 110) == pytest.approx(1.0)
    assert learning_rate(60, cfg, 110) == pytest.approx(0.55)
    assert learning_rate(110, cfg, 110) == pytest.approx(0.1)


def train_records(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    drop = {"time", "tokens_per_sec", "flops_per_sec"}  # wall-clock fields differ between runs
    return [{k: v for k, v in r.items() if k not in drop} for r in lines]


def test_interrupted_then_resumed_training_reproduces_metrics_exactly(tiny_cfg_factory, tmp_path, monkeypatch):
    full_cfg = tiny_cfg_factory(f"train.out_dir={tmp_path / 'full'}", "model.dropout=0.1")
    train(full_cfg, progress_print=lambda *_: None)

    crash_cfg = tiny_cfg_factory(f"train.out_dir={tmp_path / 'crash'}", "model.dropout=0.1")
    original = Trainer.train_step

    def crashing_step(self):
        if self.step == 10:  # after the step-8 checkpoint and two more logged steps
            raise RuntimeError("simulated crash")
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", crashing_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crash_cfg, progress_print=lambda *_: None)
    assert (tmp_path / "crash" / "checkpoints" / "latest").read_text().strip() == "step-0000008"
    assert train_records(tmp_path / "crash")[-1]["step"] == 10  # records past the checkpoint exist
    monkeypatch.setattr(Trainer, "train_step", original)
    train(crash_cfg, resume=True, progress_print=lambda *_: None)

    full, resumed = train_records(tmp_path / "full"), train_records(tmp_path / "crash")
    assert [r["step"] for r in full] == [r["step"] for r in resumed]
    assert full == resumed  # losses, S, grad norms, FLOPs, validation: bit-identical
    a = ckpt.load_weights(ckpt.checkpoint_path(tmp_path / "full"), use_ema=False)
    b = ckpt.load_weights(ckpt.checkpoint_path(tmp_path / "crash"), use_ema=False)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_lowers_the_loss_and_logs_flops(tiny_cfg_factory):
    cfg = tiny_cfg_factory("train.max_steps=30", "train.eval_every=0", "train.checkpoint_every=100")
    summary = train(cfg, progress_print=lambda *_: None)
    cfg_dir = Path(cfg.train.out_dir)
    records = [r for r in train_records(cfg_dir) if r["kind"] == "train"]
    assert np.mean([r["loss"] for r in records[-5:]]) < np.mean([r["loss"] for r in records[:5]])
    assert all(1 <= r["loops"] <= 3 for r in records)
    flops = [r["flops"] for r in records]
    assert all(b > a for a, b in zip(flops, flops[1:]))
    assert summary["step"] == 30 and (cfg_dir / "config.yaml").is_file()
    assert (cfg_dir / "checkpoints" / "step-0000030" / "ema.safetensors").is_file()


def test_flops_budget_stops_training(tiny_cfg_factory):
    from loopmdm.model.flops import train_flops
    cfg = tiny_cfg_factory("train.max_steps=0", "train.max_flops=1e9")
    summary = train(cfg, progress_print=lambda *_: None)
    assert summary["flops"] >= 1e9
    cfg.model.vocab_size = 300
    assert summary["flops"] < 1e9 + 8 * train_flops(cfg.model, 32, 3)  # stopped at the first step past it


def test_existing_run_is_not_overwritten_without_consent(tiny_cfg_factory):
    cfg = tiny_cfg_factory("train.max_steps=4")
    train(cfg, progress_print=lambda *_: None)
    metrics = Path(cfg.train.out_dir) / "metrics.jsonl"
    content = metrics.read_text()
    with pytest.raises(LoopMDMError, match="already holds a checkpoint"):
        train(cfg, progress_print=lambda *_: None)
    assert metrics.read_text() == content
    partial = Path(cfg.train.out_dir).parent / "partial"
    partial.mkdir()
    (partial / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    with pytest.raises(LoopMDMError, match="not empty"):
        train(tiny_cfg_factory(f"train.out_dir={partial}"), progress_print=lambda *_: None)
    assert (partial / "metrics.jsonl").read_text() == '{"kind": "train", "step": 1}\n'
    with pytest.raises(LoopMDMError, match="only train"):
        train(tiny_cfg_factory("train.max_steps=8", "model.d_model=64"), resume=True, progress_print=lambda *_: None)


def test_checkpoint_is_atomic_and_loads_back(tiny_cfg_factory, monkeypatch):
    cfg = tiny_cfg_factory("train.max_steps=4")
    train(cfg, progress_print=lambda *_: None)
    run = load_run(cfg.train.out_dir, device="cpu")
    assert run.step == 4 and run.model.mask_id == 300
    path = ckpt.checkpoint_path(cfg.train.out_dir)
    assert not list(path.parent.glob(".tmp-*"))
    # A failure while writing a new checkpoint leaves `latest` on the old, complete one.
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(LoopMDMError, match="disk full .* step-0000004 is kept"):  # one line, not a traceback
        ckpt.save_checkpoint(cfg.train.out_dir, 5, {"w": torch.zeros(2)}, None, {"step": 5})
    monkeypatch.undo()
    assert not list(path.parent.glob(".tmp-*"))  # the partial folder is gone
    assert ckpt.checkpoint_path(cfg.train.out_dir) == path
    assert load_run(cfg.train.out_dir, device="cpu").step == 4
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(LoopMDMError, match="corrupt"):
        load_run(cfg.train.out_dir, device="cpu", use_ema=False)


def test_malloc_tuning_applies_on_linux_glibc():
    import platform
    import sys

    from loopmdm.training.allocator import tune_glibc_malloc

    applied = tune_glibc_malloc()
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert applied is True
    else:
        assert applied is False


def test_ema_warms_up_then_follows_decay():
    from loopmdm.training.ema import EMA

    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.99)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # n = 1: d = 2 / 11
    torch.testing.assert_close(ema.shadow["weight"], torch.full((1, 2), 9 / 11))
    for _ in range(49):
        ema.update(model)
    # Target 1 from 0: after n updates the shadow is 1 - prod_k d_k.
    expected = 1.0 - float(np.prod([min(0.99, (1 + k) / (10 + k)) for k in range(1, 51)]))
    torch.testing.assert_close(ema.shadow["weight"], torch.full((1, 2), expected))


def test_padded_data_trains_and_pads_never_count(tiny_cfg_factory):
    """packing=pad: one document per row; pads are never masked, scored or attended to."""
    cfg = tiny_cfg_factory("data.packing=pad", "data.seq_len=64", "train.max_steps=3")
    summary = train(cfg, progress_print=lambda *_: None)
    assert np.isfinite(summary["val_nll"])
    from loopmdm.data.prepare import prepare_data

    data = prepare_data(cfg.data)
    assert data.meta["packing"] == "pad" and (data.blocks("train") == data.pad_id).any()
    from loopmdm.diffusion.objective import diffusion_loss
    from loopmdm.diffusion.schedule import make_schedule

    run = load_run(cfg.train.out_dir, device="cpu")
    x0 = torch.from_numpy(data.blocks("val")[:4].astype(np.int64))
    valid = x0 != data.pad_id
    out = diffusion_loss(run.model, x0, make_schedule("linear"), num_loops=2, eps=0.0, valid=valid,
                         t=torch.ones(4))
    assert out.num_tokens == int(valid.sum()) and int(out.num_masked) == int(valid.sum())  # t = 1: all real tokens


def test_sigterm_stops_between_steps_saves_and_resumes_exactly(tiny_cfg_factory, tmp_path, monkeypatch):
    import os
    import signal

    full_cfg = tiny_cfg_factory(f"train.out_dir={tmp_path / 'full'}")
    train(full_cfg, progress_print=lambda *_: None)

    cfg = tiny_cfg_factory(f"train.out_dir={tmp_path / 'preempted'}")
    original = Trainer.train_step

    def preempted_step(self):
        if self.step == 5:  # the signal lands in the middle of step 6
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", preempted_step)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress_print=lambda *_: None)
    assert (tmp_path / "preempted" / "checkpoints" / "latest").read_text().strip() == "step-0000006"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    monkeypatch.setattr(Trainer, "train_step", original)
    train(cfg, resume=True, progress_print=lambda *_: None)
    assert train_records(tmp_path / "full") == train_records(tmp_path / "preempted")


def test_loop_knobs_switch_on_partway_and_scale_the_loop_lr(tiny_cfg_factory, tmp_path):
    """train.loops_from_step keeps S = 1 before that step; train.loop_lr_scale gives the loop
    block its own learning rate (the rest keeps train.lr)."""
    from loopmdm.training.loops import train_num_loops

    assert [train_num_loops(s, 0, 8, loops_from_step=5) for s in range(5)] == [1] * 5
    assert {train_num_loops(s, 0, 8, loops_from_step=5) for s in range(5, 200)} == set(range(1, 9))
    cfg = tiny_cfg_factory("train.loop_lr_scale=0.25", "train.loops_from_step=6", "train.max_steps=8",
                           "train.warmup_steps=0")
    summary = train(cfg)
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    loops = [r["loops"] for r in records if r.get("kind") == "train"]
    assert loops[:6] == [1] * 6 and summary["step"] == 8
    from loopmdm.data.prepare import prepare_data
    from loopmdm.training.trainer import Trainer

    trainer = Trainer(cfg, prepare_data(cfg.data), tmp_path / "other")
    trainer.train_step()
    loop_params = {id(p) for p in trainer.model.loop_block.parameters()}
    for group in trainer.optimizer.param_groups:
        in_loop = {id(p) in loop_params for p in group["params"]}
        assert len(in_loop) <= 1
        assert group["lr"] == pytest.approx(cfg.train.lr * (0.25 if in_loop == {True} else 1.0))


def test_resume_of_a_run_saved_before_newer_model_options(tiny_cfg_factory, tmp_path):
    """A run whose config.yaml predates model.time_input / attention_dropout resumes with the
    settings it was trained with (1000·t, dropout on attention), not the new defaults."""
    import yaml

    cfg = tiny_cfg_factory("train.max_steps=4", "model.dropout=0.1")
    train(cfg)
    config_file = tmp_path / "run" / "config.yaml"
    saved = yaml.safe_load(config_file.read_text())
    for key in ("time_input", "attention_dropout", "noise_schedule", "noise_eps"):
        saved["model"].pop(key, None)
    config_file.write_text(yaml.safe_dump(saved))
    summary = train(tiny_cfg_factory("train.max_steps=6", "model.dropout=0.1"), resume=True)
    assert summary["step"] == 6
    resumed = yaml.safe_load(config_file.read_text())["model"]
    assert resumed["time_input"] == "1000t" and resumed["attention_dropout"] is True
