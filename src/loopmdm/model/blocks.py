"""Transformer blocks. Both styles share one call signature, `block(x, c, rotary, key_mask)`,
so the looped denoiser can stack either without knowing which it holds."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from loopmdm.model.layers import LayerNormNoBias, RMSNorm, Rotary, SelfAttention


def gather_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, L, D) at positions index (B, A) -> (B, A, D)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1.0 + scale) + shift


class DiTBlock(nn.Module):
    """MDLM's DDiT block: pre-norm attention and GELU-tanh MLP, each modulated by adaLN
    (shift, scale, gate) computed from the conditioning vector c. The modulation Linear is
    zero-initialised, so every gate starts at 0 and the block starts as the identity.

    Dropout as MDLM's `bias_dropout_add_scale`: on the attention output (after its out
    projection) and on the MLP output, before the gate and the residual add; none on the
    attention probabilities unless `attention_dropout` (an option, not MDLM)."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float, cond_dim: int, dropout: float = 0.0,
                 attention_dropout: bool = False, causal: bool = False):
        super().__init__()
        hidden = int(mlp_ratio * dim)
        self.norm1 = LayerNormNoBias(dim)
        self.attn = SelfAttention(dim, n_heads, dropout if attention_dropout else 0.0, causal)
        self.norm2 = LayerNormNoBias(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rotary: Rotary,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        mods = self.adaLN_modulation(c)[:, None, :].chunk(6, dim=-1)
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = mods
        h = self.attn(modulate(self.norm1(x), shift_attn, scale_attn), rotary, key_mask)
        x = x + gate_attn * self.dropout(h)
        h = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x + gate_mlp * self.dropout(h)

    def forward_at(self, x: torch.Tensor, c: torch.Tensor, rotary: Rotary, index: torch.Tensor,
                   key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """forward() for the positions `index` (B, A) only, every position still attended as a
        key/value: returns their new states (B, A, D)."""
        mods = self.adaLN_modulation(c)[:, None, :].chunk(6, dim=-1)
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = mods
        kv_in = modulate(self.norm1(x), shift_attn, scale_attn)
        h = self.attn.attend(gather_positions(kv_in, index), kv_in, index, rotary, key_mask)
        x = gather_positions(x, index) + gate_attn * self.dropout(h)
        h = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x + gate_mlp * self.dropout(h)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """LLaMA's 2/3 rule, rounded up to a multiple of 64, so SwiGLU's cost ~ a GELU MLP's."""
    hidden = int(2 * mlp_ratio * dim / 3)
    return 64 * ((hidden + 63) // 64)


class LlamaBlock(nn.Module):
    """SMDM/LLaDA block: RMSNorm, attention, SwiGLU, no biases, no conditioning."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float, cond_dim: int = 0, dropout: float = 0.0,
                 attention_dropout: bool = False, causal: bool = False):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = SelfAttention(dim, n_heads, dropout if attention_dropout else 0.0, causal)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None, rotary: Rotary,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x), rotary, key_mask))
        return x + self.dropout(self.mlp(self.norm2(x)))

    def forward_at(self, x: torch.Tensor, c: torch.Tensor | None, rotary: Rotary, index: torch.Tensor,
                   key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """forward() for the positions `index` (B, A) only (see DiTBlock.forward_at)."""
        kv_in = self.norm1(x)
        x = gather_positions(x, index) + self.dropout(
            self.attn.attend(gather_positions(kv_in, index), kv_in, index, rotary, key_mask))
        return x + self.dropout(self.mlp(self.norm2(x)))


class DiTFinalLayer(nn.Module):
    """Final LayerNorm + adaLN (shift, scale) + zero-initialised output Linear (MDLM)."""

    def __init__(self, dim: int, vocab_size: int, cond_dim: int):
        super().__init__()
        self.norm = LayerNormNoBias(dim)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * dim)
        self.linear = nn.Linear(dim, vocab_size)
        for layer in (self.adaLN_modulation, self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class LlamaFinalLayer(nn.Module):
    def __init__(self, dim: int, vocab_size: int, cond_dim: int = 0):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.linear = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        return self.linear(self.norm(x))


BLOCKS = {"dit": (DiTBlock, DiTFinalLayer), "llama": (LlamaBlock, LlamaFinalLayer)}
