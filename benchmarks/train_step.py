"""The training step both speed benchmarks time (loop_overhead.py, throughput.py): forward at a
given S, MDLM's NELBO, backward, clipping and AdamW on a fixed batch -- what the trainer does per
step, without the data loader, EMA or logging."""

from __future__ import annotations

from typing import Callable

import torch

from loopmdm.devices import autocast_context
from loopmdm.diffusion.objective import diffusion_loss
from loopmdm.diffusion.schedule import make_schedule


def make_train_step(model, cfg, device: torch.device, precision: str, batch: int, seq_len: int) -> Callable[[int], None]:
    """`step(num_loops)` on a fixed random batch; synchronises CUDA so wall time is step time."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.eps)
    x0 = torch.randint(0, cfg.model.vocab_size, (batch, seq_len), device=device)
    generator = torch.Generator(device=device).manual_seed(0)

    def step(num_loops: int) -> None:
        with autocast_context(device, precision):
            out = diffusion_loss(model, x0, schedule, num_loops=num_loops, eps=cfg.diffusion.eps, generator=generator)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step
