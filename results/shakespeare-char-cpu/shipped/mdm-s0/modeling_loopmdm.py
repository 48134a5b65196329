"""LoopMDM as a Hugging Face masked LM: the looped denoiser of "Looped Diffusion Language
Models" (Lee et al.), Sec. 3:

    H^0 = prelude(x_t);  H^k = loop_block(H^{k-1}), k = 1..S;  p_theta(x_0 | x_t) = coda(H^S)

Self-contained (torch + transformers only) and numerically the same computation as the
loopmdm package's `model/denoiser.py`, `blocks.py` and `layers.py`: the same module tree and
parameter names, so the exported safetensors are the project's state dict unchanged.

Output: `logits` (B, L, vocab_size) over the real tokens only. The diffusion [MASK] token
(id vocab_size) has no column: MDLM's SUBS parameterisation gives it probability zero, and
leaving it out is the same. log_softmax(logits) is the denoiser's p_theta(x_0 | x_t) at every
position; a sampler keeps unmasked tokens as they are (SUBS carry-over) and uses the
predictions only at masked positions.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_loopmdm import LoopMDMConfig

# alpha(t) is floored before -log alpha, as in the project's diffusion/schedule.py.
SIGMA_ALPHA_FLOOR = 1e-6
SIGMA_MAX = -math.log(SIGMA_ALPHA_FLOOR)


def total_noise(t: torch.Tensor, schedule: str, eps: float) -> torch.Tensor:
    """sigma(t) = -log alpha(t) of the run's noise schedule (MDLM's `total_noise`)."""
    if schedule == "loglinear":
        return (-torch.log1p(-(1.0 - eps) * t)).clamp_max(SIGMA_MAX)
    alpha = 1.0 - t if schedule == "linear" else 1.0 - torch.cos(0.5 * math.pi * (1.0 - t))
    return -torch.log(alpha.clamp_min(SIGMA_ALPHA_FLOOR))


# --------------------------------------------------------------------------- layers

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


def rotary_cos_sin(seq_len: int, head_dim: int, base: float, device: torch.device):
    """RoFormer rotary tables, rotate-half layout. Computed per call, not kept in a buffer:
    transformers materialises non-persistent buffers uninitialised when loading."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    pos = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq.to(device))
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention with RoPE on q and k, no biases."""

    def __init__(self, dim: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.dropout = dropout

    def forward(self, x, rotary, key_mask=None):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        cos, sin = rotary
        q, k = apply_rotary(q, cos, sin).to(v.dtype), apply_rotary(k, cos, sin).to(v.dtype)
        attn_mask = key_mask[:, None, None, :] if key_mask is not None else None  # True = attend
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, L, D))


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
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # a bf16 model without autocast works too


# --------------------------------------------------------------------------- blocks

def modulate(x, shift, scale):
    return x * (1.0 + scale) + shift


class DiTBlock(nn.Module):
    """MDLM's DDiT block: adaLN-modulated (shift, scale, gate) attention and GELU-tanh MLP."""

    def __init__(self, dim, n_heads, mlp_ratio, cond_dim, dropout=0.0, attention_dropout=False):
        super().__init__()
        hidden = int(mlp_ratio * dim)
        self.norm1 = LayerNormNoBias(dim)
        self.attn = SelfAttention(dim, n_heads, dropout if attention_dropout else 0.0)
        self.norm2 = LayerNormNoBias(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim)
        self.adaLN_modulation.zero_init = True
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, c, rotary, key_mask=None):
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c)[:, None, :].chunk(6, dim=-1)
        h = self.attn(modulate(self.norm1(x), shift_attn, scale_attn), rotary, key_mask)
        x = x + gate_attn * self.dropout(h)
        h = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x + gate_mlp * self.dropout(h)


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def swiglu_hidden(dim, mlp_ratio):
    """LLaMA's 2/3 rule, rounded up to a multiple of 64."""
    hidden = int(2 * mlp_ratio * dim / 3)
    return 64 * ((hidden + 63) // 64)


class LlamaBlock(nn.Module):
    """SMDM/LLaDA block: RMSNorm, attention, SwiGLU, no biases, no conditioning."""

    def __init__(self, dim, n_heads, mlp_ratio, cond_dim=0, dropout=0.0, attention_dropout=False):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = SelfAttention(dim, n_heads, dropout if attention_dropout else 0.0)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, c, rotary, key_mask=None):
        x = x + self.dropout(self.attn(self.norm1(x), rotary, key_mask))
        return x + self.dropout(self.mlp(self.norm2(x)))


class DiTFinalLayer(nn.Module):
    def __init__(self, dim, vocab_size, cond_dim):
        super().__init__()
        self.norm = LayerNormNoBias(dim)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * dim)
        self.linear = nn.Linear(dim, vocab_size)
        self.adaLN_modulation.zero_init = self.linear.zero_init = True

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class LlamaFinalLayer(nn.Module):
    def __init__(self, dim, vocab_size, cond_dim=0):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.linear = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, x, c):
        return self.linear(self.norm(x))


BLOCKS = {"dit": (DiTBlock, DiTFinalLayer), "llama": (LlamaBlock, LlamaFinalLayer)}


# --------------------------------------------------------------------------- the model

class LoopMDMPreTrainedModel(PreTrainedModel):
    config_class = LoopMDMConfig
    base_model_prefix = "loopmdm"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DiTBlock", "LlamaBlock"]

    @torch.no_grad()
    def _init_weights(self, module):
        """Only for a model built from a config (from_pretrained loads every weight): close to
        the project's init, MDLM's for DiT (adaLN and output zeroed), N(0, 0.02) for llama."""
        dit = self.config.block == "dit"
        if isinstance(module, (LayerNormNoBias, RMSNorm)):
            module.weight.fill_(1.0)
        elif isinstance(module, nn.Embedding):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5)) if dit else nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.Linear):
            if getattr(module, "zero_init", False):  # DiT's adaLN and output layers
                module.weight.zero_()
            elif dit:  # PyTorch's default Linear init
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            else:
                nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                module.bias.zero_()


class LoopMDMForMaskedLM(LoopMDMPreTrainedModel):
    """x_t (B, L) token ids, mask id = vocab_size -> logits (B, L, vocab_size)."""

    def __init__(self, config: LoopMDMConfig):
        super().__init__(config)
        d = config.d_model
        self.embed = nn.Embedding(config.vocab_size + 1, d)  # one extra row: the mask token
        self.time_embed = TimestepEmbedder(config.cond_dim) if config.block == "dit" else None
        block_cls, final_cls = BLOCKS[config.block]

        def make_blocks(n):
            return nn.ModuleList(block_cls(d, config.n_heads, config.mlp_ratio, config.cond_dim, config.dropout,
                                           config.attention_dropout) for _ in range(n))

        looped = config.loop_start is not None
        start, end = (config.loop_start, config.loop_end) if looped else (config.n_layers, config.n_layers)
        self.prelude = make_blocks(start)
        self.loop_block = make_blocks(end - start)
        self.coda = make_blocks(config.n_layers - end)
        self.head = final_cls(d, config.vocab_size, config.cond_dim)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def condition(self, t, batch, device):
        """adaLN vector silu(embed(time_input(t))); a time-agnostic model (MDLM's default)
        always sees 0, as MDLM zeroes sigma."""
        if self.time_embed is None:
            return None
        if not self.config.time_conditioning or t is None:
            s = torch.zeros(batch, device=device)
        else:
            t = torch.as_tensor(t, dtype=torch.float32, device=device)
            t = t.expand(batch) if t.dim() == 0 else t
            s = (total_noise(t, self.config.noise_schedule, self.config.noise_eps)
                 if self.config.time_input == "sigma" else 1000.0 * t)
        return F.silu(self.time_embed(s))

    def forward(self, input_ids=None, attention_mask=None, num_loops=None, t=None, labels=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        """input_ids: x_t, masked positions set to config.mask_id (tokenizer.mask_token_id). attention_mask (B, L):
        1 = a real token, 0 = padding hidden from every query. num_loops: S, the loop block's
        iterations (default config.num_loops). t: diffusion time in [0, 1], shape (B,) or a
        scalar; used only by a time-conditioned run. labels: plain cross-entropy over positions
        != -100 (not the diffusion NELBO, which weights masked positions by 1/t).
        hidden_states, with output_hidden_states: (H^0, H^1, ..., H^S)."""
        num_loops = self.config.num_loops if num_loops is None else num_loops
        if isinstance(num_loops, bool) or not isinstance(num_loops, int) or num_loops < 1:
            raise ValueError(f"num_loops={num_loops!r} must be an integer >= 1")
        output_hidden_states = (self.config.output_hidden_states if output_hidden_states is None
                                else output_hidden_states)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        B, L = input_ids.shape
        key_mask = attention_mask.bool() if attention_mask is not None else None
        c = self.condition(t, B, input_ids.device)
        rotary = rotary_cos_sin(L, self.config.d_model // self.config.n_heads, self.config.rope_base, input_ids.device)

        h = self.embed(input_ids)
        for block in self.prelude:
            h = block(h, c, rotary, key_mask)
        h0, hidden = h, [h]
        for k in range(num_loops if len(self.loop_block) else 0):
            if self.config.input_injection and k > 0:
                h = h + h0  # ablation: re-inject the prelude output (S = 1 unchanged)
            for block in self.loop_block:
                h = block(h, c, rotary, key_mask)
            hidden.append(h)
        for block in self.coda:
            h = block(h, c, rotary, key_mask)
        logits = self.head(h, c)

        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        hidden_states = tuple(hidden) if output_hidden_states else None
        if not return_dict:
            return tuple(v for v in (loss, logits, hidden_states) if v is not None)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=hidden_states)


__all__ = ["LoopMDMConfig", "LoopMDMPreTrainedModel", "LoopMDMForMaskedLM"]
