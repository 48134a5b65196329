"""Count FSDP2's collectives for one forward + backward of the looped denoiser, wrapped as
`train.parallel=fsdp` wraps it (training/distributed.py), and with the loop block resharded
after every call instead, to show what `reshard_after_forward=False` on the loop block saves.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/fsdp_collectives.py --loops 3
(2 processes, gloo on CPU; the tiny 3-layer model with one loop layer.)
"""

from __future__ import annotations

import argparse
import collections
import os
import socket
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COUNTED = ("all_gather_single", "reduce_scatter_single")  # FSDP2's collectives in torch 2.13


def _worker(rank: int, port: int, num_loops: int) -> None:
    from torch.distributed.fsdp import fully_shard

    from loopmdm.config import ModelConfig
    from loopmdm.model.denoiser import LoopedDenoiser
    from loopmdm.training.distributed import FSDPContext

    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    counts = collections.Counter()
    for name in COUNTED:
        original = getattr(dist, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    cfg = ModelConfig(vocab_size=50, n_layers=3, d_model=32, n_heads=2, cond_dim=16, loop_start=1, loop_end=2,
                      max_train_loops=num_loops)
    for label in ("train.parallel=fsdp (loop block kept gathered)", "loop block resharded after each call"):
        torch.manual_seed(0)
        model = LoopedDenoiser(cfg)
        if label.startswith("train"):
            FSDPContext(rank, 2, torch.device("cpu")).wrap(model)
        else:
            for block in [*model.prelude, *model.loop_block, *model.coda]:
                fully_shard(block)
            fully_shard(model)
        x = torch.randint(0, 50, (2, 8))
        counts.clear()
        logits = model(x, num_loops=num_loops)
        forward = dict(counts)
        counts.clear()
        logits.float().logsumexp(-1).mean().backward()
        if rank == 0:
            print(f"S={num_loops} {label}: forward {forward}, backward {dict(counts)}", flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loops", type=int, default=3)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, args.loops), nprocs=2)


if __name__ == "__main__":
    main()
