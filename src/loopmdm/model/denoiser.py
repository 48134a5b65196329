"""The looped denoiser: prelude (run once) -> loop_block (run num_loops times, shared
weights) -> coda (run once) -> output head.

Paper Sec. 3: H^0 = prelude(x_t); H^k = loop_block(H^{k-1}), k = 1..S; p_theta = coda(H^S).
With no loop range the same class is the plain MDM baseline (every layer in the prelude).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from loopmdm.config import ModelConfig, validate_model
from loopmdm.diffusion.schedule import make_schedule
from loopmdm.errors import LoopMDMError, require
from loopmdm.model.blocks import BLOCKS
from loopmdm.model.layers import Rotary, TimestepEmbedder


def check_num_loops(num_loops) -> int:
    if isinstance(num_loops, bool) or not isinstance(num_loops, int) or num_loops < 1:
        raise LoopMDMError(f"num_loops={num_loops!r} must be an integer >= 1")
    return num_loops


def relative_change(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """||H^k - H^(k-1)|| / ||H^(k-1)|| per position (norms over the hidden dimension, in fp32):
    what adaptive halting thresholds (sampling/loop_runner.py) and `loopmdm analyze` reports."""
    return (new.float() - old.float()).norm(dim=-1) / old.float().norm(dim=-1).clamp_min(1e-12)


class LoopedDenoiser(nn.Module):
    """x_t (B, L) token ids, mask id = vocab_size -> logits (B, L, vocab_size).

    The head never predicts the mask token: its output has only the real vocabulary
    (MDLM's SUBS parameterisation gives the mask -inf logit; leaving it out is the same)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        validate_model(cfg)
        require(cfg.vocab_size > 0, "model.vocab_size must be set (> 0) before building the model")
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.mask_id = cfg.vocab_size
        d = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size + 1, d)  # one extra row: the mask token
        self.time_embed = TimestepEmbedder(cfg.cond_dim) if cfg.block == "dit" else None
        self.noise_schedule = make_schedule(cfg.noise_schedule, cfg.noise_eps)  # sigma(t) for time_input=sigma
        self.rotary = Rotary(d // cfg.n_heads, cfg.rope_base)
        block_cls, final_cls = BLOCKS[cfg.block]

        def make_blocks(n: int) -> nn.ModuleList:
            return nn.ModuleList(block_cls(d, cfg.n_heads, cfg.mlp_ratio, cfg.cond_dim, cfg.dropout,
                                           cfg.attention_dropout, cfg.causal) for _ in range(n))

        start, end = (cfg.loop_start, cfg.loop_end) if cfg.is_looped else (cfg.n_layers, cfg.n_layers)
        self.prelude = make_blocks(start)
        self.loop_block = make_blocks(end - start)
        self.coda = make_blocks(cfg.n_layers - end)
        self.head = final_cls(d, cfg.vocab_size, cfg.cond_dim)
        self._init_weights()

    # ----------------------------------------------------------------- init & sizes
    def _init_weights(self) -> None:
        if self.cfg.block == "dit":
            # MDLM: PyTorch's default Linear init, kaiming-uniform embedding; adaLN and the
            # output layer were zero-initialised in their constructors.
            nn.init.kaiming_uniform_(self.embed.weight, a=math.sqrt(5))
            return
        # LLaMA-style: N(0, 0.02), residual projections scaled by 1/sqrt(2 * depth) (GPT-2).
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
                if name.endswith(("attn.out.weight", "mlp.down.weight")):
                    p.data.mul_(1.0 / math.sqrt(2 * self.cfg.n_layers))

    @property
    def is_looped(self) -> bool:
        return len(self.loop_block) > 0

    def num_params(self, non_embedding: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:  # Kaplan et al.: leave out the token embedding and the vocabulary head
            total -= self.embed.weight.numel() + self.head.linear.weight.numel()
        return total

    # ----------------------------------------------------------------- the three stages
    def time_input(self, t: torch.Tensor) -> torch.Tensor:
        """What the timestep embedder sees for diffusion time t (B,): MDLM's total noise
        sigma(t) = -log alpha(t) of the schedule (default), or DiT's 1000·t."""
        t = t.float()
        return self.noise_schedule.sigma(t) if self.cfg.time_input == "sigma" else 1000.0 * t

    def condition(self, t: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
        """adaLN conditioning vector silu(embed(time_input(t))). Time-agnostic models (MDLM's
        default) feed 0, as MDLM zeroes sigma; callers always pass the diffusion time t."""
        if self.time_embed is None:
            return None
        if not self.cfg.time_conditioning or t is None:
            s = torch.zeros(batch, device=device)
        else:
            s = self.time_input(t)
        return torch.nn.functional.silu(self.time_embed(s))

    def run_prelude(self, x: torch.Tensor, c, key_mask=None) -> torch.Tensor:
        h = self.embed(x)
        for block in self.prelude:
            h = block(h, c, self.rotary, key_mask)
        return h

    def loop_step(self, h: torch.Tensor, c, key_mask=None) -> torch.Tensor:
        """One iteration of the shared loop block: H^k = loop_block(H^{k-1})."""
        for block in self.loop_block:
            h = block(h, c, self.rotary, key_mask)
        return h

    def loop_step_at(self, h: torch.Tensor, c, active: torch.Tensor, key_mask=None) -> torch.Tensor:
        """One loop iteration that updates only the `active` (B, L) positions: the others pass
        through every layer of the loop block unchanged, their keys and values still attended.
        The block runs on the A = (most active positions in a row) gathered positions, so the
        MLP, the queries and the scores of frozen positions are skipped (per-token halting;
        their keys and values are still projected). With every position active it equals
        loop_step() up to float rounding."""
        B, L, D = h.shape
        counts = active.sum(1)
        A = int(counts.max())
        # Active positions first in each row (stable: in position order); the padding slots
        # of rows with fewer than A actives hold frozen positions, whose results are dropped.
        index = torch.argsort((~active).to(torch.int8), dim=1, stable=True)[:, :A]
        valid = (torch.arange(A, device=h.device)[None, :] < counts[:, None])[..., None]
        scatter_index = index[..., None].expand(-1, -1, D)
        for block in self.loop_block:
            new = block.forward_at(h, c, self.rotary, index, key_mask)
            new = torch.where(valid, new, h.gather(1, scatter_index))
            h = h.scatter(1, scatter_index, new.to(h.dtype))
        return h

    def run_coda(self, h: torch.Tensor, c, key_mask=None) -> torch.Tensor:
        for block in self.coda:
            h = block(h, c, self.rotary, key_mask)
        return self.head(h, c)

    # ----------------------------------------------------------------- the loop driver
    def iterate_loop(self, h0: torch.Tensor, c, key_mask=None, num_loops: int | None = None,
                     h_start: torch.Tensor | None = None, merge=None, step=None):
        """Yield H^1, H^2, ... from H^0 = prelude output: the one place the loop is run.

        `forward()`, loop diagnostics and adaptive halting all drive the loop through this
        generator, so input injection, truncated gradients and per-iteration checkpointing
        behave identically everywhere. `num_loops=None` loops until the caller stops
        (adaptive halting); truncated gradients need the total, so they apply only when it
        is given. Sampling hooks (sampling/loop_runner.py): `h_start` replaces H^0 as the
        state the loop starts from (warm start; input injection still re-adds H^0), and
        `merge(k, h_prev, h_new)` returns the state kept after iteration k (halting freezes
        converged positions), and `step(h, c, key_mask)`, if given, runs the iteration instead of
        loop_step (per-token halting skips frozen positions, `loop_step_at`)."""
        if not self.is_looped:
            return
        if num_loops is not None:
            num_loops = check_num_loops(num_loops)
        grad_loops = self.cfg.grad_loops
        # Truncated backprop (Huginn; ablation): early iterations run without a graph.
        first_grad_iter = max(0, num_loops - grad_loops) if grad_loops > 0 and num_loops is not None else 0
        h, k = (h0 if h_start is None else h_start), 0
        while num_loops is None or k < num_loops:
            h_prev = h
            if self.cfg.input_injection and k > 0:
                h = h + h0  # ablation: re-inject the prelude output (S = 1 unchanged)
            if k < first_grad_iter and torch.is_grad_enabled():
                with torch.no_grad():
                    h = self.loop_step(h, c, key_mask)
            elif self.cfg.checkpoint_loops and self.training and torch.is_grad_enabled():
                h = checkpoint(self.loop_step, h, c, key_mask, use_reentrant=False)
            else:
                h = (step or self.loop_step)(h, c, key_mask)
            k += 1
            if merge is not None:
                h = merge(k, h_prev, h)
            yield h

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, num_loops: int = 1, t: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, return_hidden: bool = False):
        """Logits (B, L, V); with return_hidden also [H^0, H^1, ..., H^S] (loop outputs).

        Training applies the loss to the final loop's output only (paper Sec. 3)."""
        num_loops = check_num_loops(num_loops)
        c = self.condition(t, x.shape[0], x.device)
        h = self.run_prelude(x, c, key_mask)
        hidden = [h] if return_hidden else None
        for h in self.iterate_loop(h, c, key_mask, num_loops):
            if return_hidden:
                hidden.append(h)
        logits = self.run_coda(h, c, key_mask)
        return (logits, hidden) if return_hidden else logits


PARTS = ("prelude", "loop_block", "coda")


def restack_layers(state: dict, source: ModelConfig, target: ModelConfig) -> dict:
    """A state dict of `source`'s layout renamed to `target`'s: layer i of the stack is the same
    weights whichever part (prelude, loop block, coda) holds it, so a trained MDM can become a
    LoopMDM whose loop block is its layers [loop_start, loop_end) (retrofit, ours)."""

    def bounds(cfg: ModelConfig) -> tuple[int, int]:
        return (cfg.loop_start, cfg.loop_end) if cfg.is_looped else (cfg.n_layers, cfg.n_layers)

    (s0, s1), (t0, t1) = bounds(source), bounds(target)
    offset = {"prelude": 0, "loop_block": s0, "coda": s1}
    out = {}
    for key, value in state.items():
        part, _, rest = key.partition(".")
        if part not in PARTS:
            out[key] = value
            continue
        index, _, name = rest.partition(".")
        layer = offset[part] + int(index)
        new_part, new_index = (("prelude", layer) if layer < t0 else
                               ("loop_block", layer - t0) if layer < t1 else ("coda", layer - t1))
        out[f"{new_part}.{new_index}.{name}"] = value
    return out
