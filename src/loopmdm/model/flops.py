"""Analytic FLOPs of the looped denoiser (matmuls and attention; elementwise ops ignored).

Paper (FLOPs accounting): a step with S loops costs F_base + (S - 1) * n_loop_layers * F_layer,
where F_base is the plain model's cost. We count every matmul exactly — per-token ones
(qkv, out, MLP, head: 2 * m * n * k), attention (QK^T and AV: 2 * 2 * L^2 * d per layer,
no causal halving for a bidirectional model) and the per-sequence adaLN / timestep MLPs —
so the count matches torch's FlopCounterMode (tests/test_flops.py). Training = 3x forward
(backward ~ 2x), except loop iterations run without gradients (grad_loops), which cost 1x.
"""

from __future__ import annotations

import torch

from loopmdm.config import ModelConfig
from loopmdm.model.blocks import swiglu_hidden

FREQ_DIM = 256  # TimestepEmbedder's sinusoidal feature width


def layer_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of one transformer block on one sequence."""
    d, L = cfg.d_model, seq_len
    attn = 2 * L * d * 3 * d + 2 * L * d * d + 2 * 2 * L * L * d
    if cfg.block == "dit":
        hidden = int(cfg.mlp_ratio * d)
        mlp = 2 * 2 * L * d * hidden
        ada_ln = 2 * cfg.cond_dim * 6 * d
    else:
        hidden = swiglu_hidden(d, cfg.mlp_ratio)
        mlp = 2 * L * d * 2 * hidden + 2 * L * hidden * d
        ada_ln = 0
    return float(attn + mlp + ada_ln)


def outside_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs outside the blocks: output head, final adaLN, timestep embedder."""
    d = cfg.d_model
    head = 2 * seq_len * d * cfg.vocab_size
    if cfg.block == "dit":
        head += 2 * cfg.cond_dim * 2 * d + 2 * (FREQ_DIM * cfg.cond_dim + cfg.cond_dim * cfg.cond_dim)
    return float(head)


def layer_passes(cfg: ModelConfig, num_loops: int) -> int:
    """Blocks evaluated in one forward pass: L + (S - 1) * n_loop_layers."""
    return cfg.n_layers + (num_loops - 1) * cfg.n_loop_layers if cfg.is_looped else cfg.n_layers


def forward_flops(cfg: ModelConfig, seq_len: int, num_loops: int = 1) -> float:
    """Forward FLOPs for one sequence at S = num_loops."""
    return layer_passes(cfg, num_loops) * layer_flops(cfg, seq_len) + outside_flops(cfg, seq_len)


def train_flops(cfg: ModelConfig, seq_len: int, num_loops: int = 1) -> float:
    """Training FLOPs (forward + backward) for one sequence at S = num_loops."""
    full = 3.0 * forward_flops(cfg, seq_len, num_loops)
    if cfg.is_looped and cfg.grad_loops > 0 and num_loops > cfg.grad_loops:
        # Iterations run without a graph get no backward; without input injection the
        # gradient then cannot reach the prelude either.
        frozen_layers = (num_loops - cfg.grad_loops) * cfg.n_loop_layers
        if not cfg.input_injection:
            frozen_layers += cfg.loop_start
        full -= 2.0 * frozen_layers * layer_flops(cfg, seq_len)
    return full


def expected_train_flops(cfg: ModelConfig, seq_len: int) -> float:
    """E_S[train_flops] with S ~ U{1..max_train_loops} (S = 1 for the unlooped baseline)."""
    if not cfg.is_looped:
        return train_flops(cfg, seq_len, 1)
    loops = range(1, cfg.max_train_loops + 1)
    return sum(train_flops(cfg, seq_len, s) for s in loops) / len(loops)


def count_params(cfg: ModelConfig) -> tuple[int, int]:
    """(params, non-embedding params), counted on the meta device (no memory used)."""
    from loopmdm.model.denoiser import LoopedDenoiser

    with torch.device("meta"):
        model = LoopedDenoiser(cfg)
    return model.num_params(), model.num_params(non_embedding=True)


def flops_summary(cfg: ModelConfig, seq_len: int) -> dict:
    """The numbers `loopmdm flops` prints: sizes and training FLOPs per token."""
    params, non_embedding = count_params(cfg)
    s_max = cfg.max_train_loops if cfg.is_looped else 1
    per_token = lambda f: f / seq_len  # noqa: E731
    summary = {
        "params": params,
        "non_embedding_params": non_embedding,
        "seq_len": seq_len,
        "looped": cfg.is_looped,
        "loop_layers": [cfg.loop_start, cfg.loop_end] if cfg.is_looped else None,
        "max_train_loops": s_max,
        "layer_passes_s1": layer_passes(cfg, 1),
        "layer_passes_smax": layer_passes(cfg, s_max),
        "expected_layer_passes": (layer_passes(cfg, 1) + layer_passes(cfg, s_max)) / 2,
        "train_flops_per_token_s1": per_token(train_flops(cfg, seq_len, 1)),
        "train_flops_per_token_smax": per_token(train_flops(cfg, seq_len, s_max)),
        "train_flops_per_token_expected": per_token(expected_train_flops(cfg, seq_len)),
        # The 6N rule of thumb (SMDM's C = 6 N D) for comparison; it ignores attention and loops.
        "six_n_per_token": 6.0 * non_embedding,
    }
    return summary
