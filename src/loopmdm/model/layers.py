"""Building blocks shared by both block styles: norms, rotary embeddings, attention,
and the timestep embedder used for adaLN conditioning (MDLM's DDiT)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from loopmdm.errors import require


class LayerNormNoBias(nn.Module):
    """LayerNorm with a weight and no bias, computed in float32 (MDLM's DDiT)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = F.layer_norm(x.float(), (self.dim,))
        return (y * self.weight.float()).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class Rotary(nn.Module):
    """Rotary position embeddings (RoFormer), rotate-half layout; cos/sin cached per length."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None

    def cos_sin(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is None or self._cache[0] != seq_len or self._cache[1] != device:
            pos = torch.arange(seq_len, device=device, dtype=torch.float32)
            freqs = torch.outer(pos, self.inv_freq.to(device))
            emb = torch.cat([freqs, freqs], dim=-1)
            self._cache = (seq_len, device, emb.cos(), emb.sin())
        return self._cache[2], self._cache[3]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, L, Dh); cos/sin: (L, Dh). Rotation done in float32 for accuracy."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                       dropout_p: float = 0.0, probe=None) -> torch.Tensor:
    """SDPA's result computed step by step, softmax(Q K^T / sqrt(d) + mask) V, so the attention
    probabilities (B, H, L, L), in float32, can be handed to `probe` (analysis only: O(L^2) memory)."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if probe is not None:
            probe(probs)
        if dropout_p > 0.0:
            probs = F.dropout(probs, p=dropout_p)
        return (probs @ v.float()).to(v.dtype)


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention with RoPE on q and k; no biases (MDLM, LLaMA).
    `dropout` acts on the attention probabilities; the blocks pass 0 (MDLM) unless
    model.attention_dropout is set. `causal` = each query sees only itself and earlier keys
    (model.causal: the autoregressive judge of generative perplexity, evaluation/judge.py)."""

    def __init__(self, dim: int, n_heads: int, dropout: float = 0.0, causal: bool = False):
        super().__init__()
        self.n_heads = n_heads
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.dropout = dropout
        # Analysis hook (analysis/loop_diagnostics.py): when set, attention is computed
        # explicitly and probe(probs) sees the (B, H, L, L) softmax weights; same output.
        self.probe = None

    def forward(self, x: torch.Tensor, rotary: Rotary, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        cos, sin = rotary.cos_sin(L, x.device)
        q, k = apply_rotary(q, cos, sin).to(v.dtype), apply_rotary(k, cos, sin).to(v.dtype)
        # key_mask (B, L) True = attend; pads are hidden from every query.
        attn_mask = key_mask[:, None, None, :] if key_mask is not None else None
        if self.causal and (attn_mask is not None or self.probe is not None):
            tril = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
            attn_mask = tril if attn_mask is None else attn_mask & tril
        dropout_p = self.dropout if self.training else 0.0
        if self.probe is not None:
            y = explicit_attention(q, k, v, attn_mask, dropout_p, self.probe)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                               is_causal=self.causal and attn_mask is None)
        return self.out(y.transpose(1, 2).reshape(B, L, D))


    def attend(self, xq: torch.Tensor, xkv: torch.Tensor, index: torch.Tensor, rotary: Rotary,
               key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention for some positions only: the queries of `xq` (B, A, D), the inputs at
        positions `index` (B, A), attend to the keys and values of every position of `xkv`
        (B, L, D). The same weights and result as forward() at those positions, without the
        query, output-projection and score work of the others (per-token halting)."""
        require(not self.causal, "attention restricted to some queries is bidirectional only")
        B, A, D = xq.shape
        L, H = xkv.shape[1], self.n_heads
        w = self.qkv.weight
        q = F.linear(xq, w[:D]).view(B, A, H, D // H).transpose(1, 2)
        k, v = F.linear(xkv, w[D:]).view(B, L, 2, H, D // H).permute(2, 0, 3, 1, 4)
        cos, sin = rotary.cos_sin(L, xkv.device)
        q = apply_rotary(q, cos[index][:, None], sin[index][:, None]).to(v.dtype)
        k = apply_rotary(k, cos, sin).to(v.dtype)
        attn_mask = key_mask[:, None, None, :] if key_mask is not None else None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out(y.transpose(1, 2).reshape(B, A, D))


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the noise level -> MLP -> conditioning vector (DiT, MDLM)."""

    def __init__(self, cond_dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features)
