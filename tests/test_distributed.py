"""Multi-process training on CPU (gloo, 2 processes), DDP and FSDP2.

- the trainer runs unchanged under both contexts; every rank draws the same S;
- 2 processes match 1 process with the same global and micro batch (the 1-process run
  accumulates gradients over 4 micro-batches, 2 processes over 2 each);
- FSDP2 checkpoints are the single-process format: written by 2 processes they load in 1,
  and a 1-process checkpoint resumes in 2 FSDP2 processes, continuing exactly;
- no test can hang: workers run under a deadline, and a rank that cannot reach its master
  fails within seconds with one error line.
"""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from loopmdm.config import load_config
from loopmdm.errors import LoopMDMError
from loopmdm import checkpoint as ckpt
from tests.conftest import tiny_overrides

STEPS, RESUME_AT = 6, 3
# fp32 on CPU: the only differences between 1 and 2 processes are the order of the gradient
# sums (local accumulation vs all-reduce / reduce-scatter); measured ~1e-7 relative.
RTOL = 1e-5
DEADLINE_S = 150  # per 2-process launch; a healthy one takes ~20 s on 2 busy cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(root: Path, out: str, *extra: str) -> list[str]:
    """The tiny config; a batch of 8 = 4 micro-batches of 2 (1 process) or 2 x 2 (2 processes)."""
    return tiny_overrides(root) + [f"train.out_dir={root / out}", f"train.max_steps={STEPS}", "train.micro_batch_size=2",
                                   "train.eval_every=0", "train.checkpoint_every=100", *extra]


def run_ranks(worker, args: tuple, nprocs: int = 2, deadline_s: float = DEADLINE_S) -> None:
    """mp.spawn with a deadline: workers still running after `deadline_s` are killed and the test
    fails with a message, instead of hanging the suite (e.g. ranks that cannot connect)."""
    context = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")
    end = time.monotonic() + deadline_s
    while not context.join(timeout=max(0.0, min(5.0, end - time.monotonic()))):
        if time.monotonic() >= end:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"{nprocs} training processes did not finish within {deadline_s:.0f} s (killed)")


def _setup_rank(rank: int, world_size: int, port: int) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world_size),
                       "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "LOOPMDM_DIST_CONNECT_TIMEOUT": "60", "LOOPMDM_DIST_TIMEOUT": "90"})
    torch.set_num_threads(1)


def _train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def _assert_close_losses(got: dict, want: dict, steps) -> None:
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=RTOL), f"step {step}: {got[step]} vs 1 process {want[step]}"


def _assert_close_weights(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=RTOL, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """1 process, 4 micro-batches of 2 per step: trained to step RESUME_AT (a copy of the run is
    kept there), then resumed to STEPS. The resumed-once run is the reference for every launch."""
    from loopmdm.training.run import train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dist")
    train(load_config(None, _overrides(root, "ref", f"train.max_steps={RESUME_AT}")), progress_print=lambda *_: None)
    shutil.copytree(root / "ref", root / f"ref-at-{RESUME_AT}")
    train(load_config(None, _overrides(root, "ref")), resume=True, progress_print=lambda *_: None)
    # Fine-tuning start: 2 steps from the reference run's (EMA) weights.
    train(load_config(None, _overrides(root, "ref-init", f"train.init_from={root / 'ref'}", "train.max_steps=2")),
          progress_print=lambda *_: None)
    return root


# ----------------------------------------------------------------------------- workers
def _ddp_worker(rank: int, world_size: int, port: int, root: str) -> None:
    _setup_rank(rank, world_size, port)
    from loopmdm.training.distributed import dist_context
    from loopmdm.training.run import train
    from loopmdm.training.trainer import Trainer

    seen_loops, trainers = [], []
    original = Trainer.train_step

    def recording_step(self):
        loss, num_loops, grad_norm = original(self)
        seen_loops.append(num_loops)
        trainers[:] = [self]
        return loss, num_loops, grad_norm

    Trainer.train_step = recording_step
    cfg = load_config(None, _overrides(Path(root), "ddp"))
    with dist_context("cpu", "ddp") as dist:
        assert dist.world_size == world_size and dist.rank == rank
        train(cfg, dist=dist, progress_print=lambda *_: None)
    weights = trainers[0].model.state_dict()  # this rank's own copy of the weights
    digest = hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights))).hexdigest()
    Path(root, f"ddp-rank{rank}.json").write_text(json.dumps({"loops": seen_loops, "digest": digest}))


def _fsdp_worker(rank: int, world_size: int, port: int, root: str) -> None:
    """Three runs in one process group: a fresh one (with activation checkpointing), the resume
    of a 1-process checkpoint, and a fine-tuning start from a 1-process run (train.init_from)."""
    _setup_rank(rank, world_size, port)
    from torch.distributed.tensor import DTensor

    from loopmdm.training.distributed import FSDPContext, dist_context
    from loopmdm.training.run import train
    from loopmdm.training.trainer import Trainer

    import functools

    from loopmdm.training import speed

    # train.compile with dynamo's aot_eager backend (graph capture and guards as inductor's,
    # without a minute of C++ compilation): per-block compile in place, then fully_shard.
    speed.compile_blocks = functools.partial(speed.compile_blocks, backend="aot_eager")
    seen = {}
    original = Trainer.train_step

    def recording_step(self):
        out = original(self)
        seen.setdefault("compiled", speed.is_compiled(self.model))  # the first run's
        seen["sharded"] = all(isinstance(p, DTensor) for p in self.model.parameters())
        seen["ema_sharded"] = all(isinstance(v, DTensor) for v in self.ema.shadow.values())
        seen["local_rows"] = self.model.embed.weight.to_local().shape[0]
        return out

    Trainer.train_step = recording_step
    with dist_context("cpu", "fsdp") as dist:
        assert isinstance(dist, FSDPContext)
        # With activation checkpointing per loop iteration and compiled blocks: recomputation
        # re-enters the FSDP units in backward; the gradients (and so the losses) must not change.
        train(load_config(None, _overrides(Path(root), "fsdp", "train.parallel=fsdp", "model.checkpoint_loops=true",
                                           "train.compile=true")),
              dist=dist, progress_print=lambda *_: None)
        train(load_config(None, _overrides(Path(root), "fsdp-resumed", "train.parallel=fsdp")), resume=True, dist=dist,
              progress_print=lambda *_: None)
        train(load_config(None, _overrides(Path(root), "fsdp-init", "train.parallel=fsdp", "train.max_steps=2",
                                           f"train.init_from={Path(root) / 'ref'}")), dist=dist, progress_print=lambda *_: None)
    Path(root, f"fsdp-rank{rank}.json").write_text(json.dumps(seen))


# ----------------------------------------------------------------------------- tests
def test_ddp_two_ranks_match_one_process(reference):
    root = reference
    run_ranks(_ddp_worker, args=(2, _free_port(), str(root)))
    r0, r1 = (json.loads((root / f"ddp-rank{r}.json").read_text()) for r in (0, 1))
    assert r0["loops"] == r1["loops"] and len(r0["loops"]) == STEPS  # same S on every rank, every step
    assert r0["digest"] == r1["digest"]  # gradients were averaged: identical weights on both ranks
    records = [json.loads(x) for x in (root / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, STEPS + 1))  # written once, by rank 0
    assert records[-1]["tokens"] == STEPS * 8 * 32  # global batch 8 = 2 ranks x 2 micro x 2 accumulation
    _assert_close_losses(_train_losses(root / "ddp"), _train_losses(root / "ref"), range(1, STEPS + 1))
    final = ckpt.checkpoint_path(root / "ddp")
    _assert_close_weights(ckpt.load_weights(final, use_ema=False), ckpt.load_weights(ckpt.checkpoint_path(root / "ref"), use_ema=False))


def test_fsdp_two_ranks_match_one_process_and_checkpoints_move_between_world_sizes(reference):
    root = reference
    shutil.copytree(root / f"ref-at-{RESUME_AT}", root / "fsdp-resumed")  # a 1-process checkpoint at step 3
    run_ranks(_fsdp_worker, args=(2, _free_port(), str(root)))
    for rank in (0, 1):  # the model and the EMA really were sharded over the 2 ranks
        seen = json.loads((root / f"fsdp-rank{rank}.json").read_text())
        assert seen["sharded"] and seen["ema_sharded"] and seen["compiled"], seen
    ref_ckpt = ckpt.checkpoint_path(root / "ref")
    ref_rows = ckpt.load_weights(ref_ckpt, use_ema=False)["embed.weight"].shape[0]
    assert seen["local_rows"] == ref_rows - (ref_rows + 1) // 2  # rank 1 holds its half of the embedding

    ref_losses = _train_losses(root / "ref")
    # A fresh 2-process FSDP2 run: same losses as 1 process.
    _assert_close_losses(_train_losses(root / "fsdp"), ref_losses, range(1, STEPS + 1))
    # Its checkpoint (gathered from the shards) in the 1-process format, loaded in this process:
    # weights, EMA and optimizer state equal to the 1-process run's.
    fsdp_ckpt = ckpt.checkpoint_path(root / "fsdp")
    for use_ema in (False, True):
        _assert_close_weights(ckpt.load_weights(fsdp_ckpt, use_ema=use_ema, require_ema=use_ema),
                              ckpt.load_weights(ref_ckpt, use_ema=use_ema, require_ema=use_ema))
    got, want = ckpt.load_train_state(fsdp_ckpt), ckpt.load_train_state(ref_ckpt)
    assert got["step"] == want["step"] == STEPS and got["loader"] == want["loader"]
    assert got["optimizer"]["param_groups"] == want["optimizer"]["param_groups"]  # the plain torch format
    assert sorted(got["optimizer"]["state"]) == sorted(want["optimizer"]["state"])
    for i, state in want["optimizer"]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(got["optimizer"]["state"][i][key], value, rtol=RTOL, atol=1e-8)
    # A 1-process checkpoint (step 3) resumed by 2 FSDP2 processes continues as 1 process did.
    _assert_close_losses(_train_losses(root / "fsdp-resumed"), ref_losses, range(1, STEPS + 1))
    _assert_close_weights(ckpt.load_weights(ckpt.checkpoint_path(root / "fsdp-resumed"), use_ema=True, require_ema=True),
                          ckpt.load_weights(ref_ckpt, use_ema=True, require_ema=True))
    # train.init_from loads the full weights into the shards.
    _assert_close_losses(_train_losses(root / "fsdp-init"), _train_losses(root / "ref-init"), (1, 2))


def test_parallel_option_is_checked(tmp_path):
    from loopmdm.training.distributed import PARALLELISMS

    assert load_config(None, tiny_overrides(tmp_path) + ["train.parallel=fsdp"]).train.parallel == "fsdp"
    with pytest.raises(LoopMDMError, match="train.parallel='zero' is not allowed; choose one of: " + ", ".join(PARALLELISMS)):
        load_config(None, tiny_overrides(tmp_path) + ["train.parallel=zero"])


def _closed_port() -> int:
    return _free_port()  # nothing listens there once the probe socket is closed


@pytest.mark.parametrize("rank", [1, 0])
def test_unreachable_peers_fail_fast_with_one_line(tmp_path, rank):
    """Rank 1 whose master port is closed (as when the loopback interface is down), and rank 0
    whose peer never arrives: both give up after LOOPMDM_DIST_CONNECT_TIMEOUT with one line."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_closed_port()), "WORLD_SIZE": "2",
           "RANK": str(rank), "LOCAL_RANK": str(rank), "LOOPMDM_DIST_CONNECT_TIMEOUT": "3", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "loopmdm.cli", "train", "tiny", *tiny_overrides(tmp_path)],
                              env=env, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("an unreachable master made `loopmdm train` hang for 60 s")
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: rank {rank} of 2 could not connect"), proc.stderr[-2000:]
    assert "MASTER_PORT=" in lines[0] and "within 3 s" in lines[0]
    assert elapsed < 40, f"took {elapsed:.0f} s"
