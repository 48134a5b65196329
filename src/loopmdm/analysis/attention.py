"""Mask->mask attention of every layer, for any model: the MDM and the deeper MDM beside
LoopMDM's loop iterations (paper Sec. 5: looping raises attention among masked positions).

For each masked query, the share of its attention weight (averaged over heads) that lands on
masked keys; averaged over the masked queries of a sequence, then over sequences. Layers are
listed in execution order, so a looped layer appears once per iteration (`loop.0@k3` is the
first loop layer at iteration 3). `masked_key_frac` is what uniform attention would give.
For a task (a given prompt, e.g. k-hop's edge list) only the answer positions are masked, as in
training, so the prompt's keys count as unmasked.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from loopmdm.data.loader import iter_eval_batches
from loopmdm.devices import autocast_context
from loopmdm.diffusion.objective import forward_mask, maskable_after, sample_times
from loopmdm.diffusion.schedule import make_schedule


@contextmanager
def _probes(blocks, make_probe):
    try:
        for name, block in blocks:
            block.attn.probe = make_probe(name)
        yield
    finally:
        for _, block in blocks:
            block.attn.probe = None


@torch.no_grad()
def mask_attention_by_layer(model, blocks: np.ndarray, cfg, device, num_loops: int | None = None,
                            batch_size: int = 32, num_batches: int = 2, seed: int = 1234,
                            prompt_len: int = 0, prompt_sep_id: int | None = None) -> dict:
    """{"layers": [names in execution order], "mask_to_mask": [one value per layer call],
    "masked_key_frac": float, "num_loops": S}. S defaults to the run's training S_max."""
    device = torch.device(device)
    num_loops = num_loops or (cfg.model.max_train_loops if model.is_looped else 1)
    named = ([(f"prelude.{i}", b) for i, b in enumerate(model.prelude)]
             + [(f"loop.{i}", b) for i, b in enumerate(model.loop_block)]
             + [(f"coda.{i}", b) for i, b in enumerate(model.coda)])
    schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.eps)
    sums: dict[str, float] = {}
    order: list[str] = []
    calls: dict[str, int] = {}
    key_frac, n_seq = 0.0, 0
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    for x0 in iter_eval_batches(blocks, batch_size, num_batches):
        x0 = x0.to(device)
        t = sample_times(x0.shape[0], cfg.diffusion.eps, True, generator, device)
        x_t, masked = forward_mask(x0, t, schedule, model.mask_id, generator, None,
                                   maskable_after(prompt_len, x0, prompt_sep_id))
        query, keys = masked.float(), masked.float()
        has = query.sum(-1) > 0
        key_frac += float((keys.mean(-1))[has].sum())
        n_seq += int(has.sum())
        calls.clear()

        def make_probe(name: str):
            def probe(probs: torch.Tensor) -> None:  # (B, H, L, L)
                k = calls.get(name, 0) + 1
                calls[name] = k
                label = f"{name}@k{k}" if name.startswith("loop.") else name
                to_masked = torch.einsum("bhqk,bk->bq", probs.float(), keys) / probs.shape[1]
                per_seq = (to_masked * query).sum(-1) / query.sum(-1).clamp_min(1)
                if label not in sums:
                    sums[label] = 0.0
                    order.append(label)
                sums[label] += float(per_seq[has].sum())
            return probe

        with _probes(named, make_probe), autocast_context(device, cfg.train.precision):
            model(x_t, num_loops=num_loops, t=t)
    model.train(was_training)
    n = max(n_seq, 1)
    # execution order: prelude, loop iterations k = 1..S (layer by layer), coda
    loop_labels = sorted((lb for lb in order if lb.startswith("loop.")),
                         key=lambda lb: (int(lb.split("@k")[1]), int(lb.split(".")[1].split("@")[0])))
    layers = [lb for lb in order if lb.startswith("prelude.")] + loop_labels + [lb for lb in order if lb.startswith("coda.")]
    return {"layers": layers, "mask_to_mask": [sums[lb] / n for lb in layers],
            "masked_key_frac": key_frac / n, "num_loops": num_loops}
