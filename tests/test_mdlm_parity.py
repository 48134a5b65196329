"""Parity with MDLM's DDiT (kuleshov-group/mdlm, models/dit.py) at tiny size.

The reference below re-derives MDLM's forward pass step by step from its published
definition — qkv split as 'b s (three h d)', rotate-half rotary on q and k (v untouched),
fp32 LayerNorm without bias, adaLN shift/scale/gate, explicit softmax attention instead of
flash-attn, final adaLN + Linear, conditioning silu(sigma_map(sigma)) with sigma = 0 for a
time-agnostic model — and applies it to our model's weights, with the loop unrolled as the
paper defines it. Our implementation must give the same logits."""

import math

import pytest
import torch
import torch.nn.functional as F

from loopmdm.config import ModelConfig
from loopmdm.model.denoiser import LoopedDenoiser


def mdlm_layer_norm(x, weight):
    return F.layer_norm(x.float(), [x.shape[-1]]) * weight[None, None, :]


def mdlm_modulate(x, shift, scale):
    return x * (1 + scale) + shift


def mdlm_rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def mdlm_timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def mdlm_block(block, x, cos, sin, c, n_heads):
    b, s, d = x.shape
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c)[:, None].chunk(6, dim=2)
    x_skip = x
    h = mdlm_modulate(mdlm_layer_norm(x, block.norm1.weight), shift_msa, scale_msa)
    qkv = (h @ block.attn.qkv.weight.T).view(b, s, 3, n_heads, d // n_heads)  # 'b s (three h d)'
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (b, s, h, dh)
    q = q * cos[None, :, None, :] + mdlm_rotate_half(q) * sin[None, :, None, :]
    k = k * cos[None, :, None, :] + mdlm_rotate_half(k) * sin[None, :, None, :]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // n_heads)
    attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, s, d)
    x = x_skip + gate_msa * (attn @ block.attn.out.weight.T)
    mlp = block.mlp(mdlm_modulate(mdlm_layer_norm(x, block.norm2.weight), shift_mlp, scale_mlp))
    return x + gate_mlp * mlp


def mdlm_forward(model: LoopedDenoiser, indices, num_loops):
    cfg = model.cfg
    x = model.embed.weight[indices]
    sigma = torch.zeros(indices.shape[0])  # time-agnostic: MDLM zeroes sigma
    c = F.silu(model.time_embed.mlp(mdlm_timestep_embedding(sigma, 256)))
    dh = cfg.d_model // cfg.n_heads
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, dh, 2).float() / dh))
    freqs = torch.einsum("i,j->ij", torch.arange(indices.shape[1]).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    blocks = list(model.prelude) + list(model.loop_block) * num_loops + list(model.coda)
    for block in blocks:
        x = mdlm_block(block, x, cos, sin, c, cfg.n_heads)
    final = model.head
    shift, scale = final.adaLN_modulation(c)[:, None].chunk(2, dim=2)
    return mdlm_modulate(mdlm_layer_norm(x, final.norm.weight), shift, scale) @ final.linear.weight.T + final.linear.bias


@pytest.mark.parametrize("num_loops", [1, 3])
def test_matches_mdlm_ddit_forward(num_loops):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=41, n_layers=4, d_model=48, n_heads=4, cond_dim=16, loop_start=1, loop_end=3)
    model = LoopedDenoiser(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # leave the zero-init regime so every term matters
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    x = torch.randint(0, 42, (2, 11), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(model(x, num_loops=num_loops), mdlm_forward(model, x, num_loops), rtol=1e-4, atol=1e-4)
