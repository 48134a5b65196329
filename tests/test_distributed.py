"""torchrun-style DDP on CPU (gloo, 2 processes): the trainer runs unchanged under the
DDP context, every rank draws the same S, and the ranks stay in lockstep."""

import hashlib
import json
import os
import socket

import torch
import torch.multiprocessing as mp

from tests.conftest import tiny_overrides


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, root: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world_size),
                       "RANK": str(rank), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    from pathlib import Path

    from loopmdm.config import load_config
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
    cfg = load_config(None, tiny_overrides(Path(root)) + ["train.max_steps=6", "train.micro_batch_size=2"])
    with dist_context("cpu") as dist:
        assert dist.world_size == world_size and dist.rank == rank
        train(cfg, dist=dist, progress_print=lambda *_: None)
    weights = trainers[0].model.state_dict()  # this rank's own copy of the weights
    digest = hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights))).hexdigest()
    Path(root, f"rank{rank}.json").write_text(json.dumps({"loops": seen_loops, "digest": digest}))


def test_ddp_two_ranks_on_cpu(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["loops"] == r1["loops"] and len(r0["loops"]) == 6  # same S on every rank, every step
    assert r0["digest"] == r1["digest"]  # gradients were averaged: identical weights on both ranks
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == [1, 2, 3, 4, 5, 6]  # written once, by rank 0
    assert records[-1]["tokens"] == 6 * 8 * 32  # global batch 8 = 2 ranks x 2 micro x 2 accumulation
