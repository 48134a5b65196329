"""Parity with MDLM's DDiT (kuleshov-group/mdlm, models/dit.py and diffusion.py) at tiny size.

The reference below is independent of the project's modules: it reads only the raw weight
tensors of the model's state dict (plus the hyperparameters n_heads, rope_base, the loop
range and the schedule's eps) and re-derives MDLM's forward pass with torch.nn.functional:

* conditioning c = silu(sigma_map(sigma)), sigma_map = sinusoidal features (256, cos|sin)
  -> Linear -> SiLU -> Linear; sigma = the log-linear total noise -log(1 - (1-eps) t) for a
  time-conditioned model (MDLM's `forward(xt, sigma)`), sigma = 0 for a time-agnostic one
  (MDLM's `_process_sigma`);
* each block: fp32 LayerNorm without bias, adaLN shift/scale/gate, qkv split as
  'b s (three h d)', rotate-half rotary on q and k (v untouched), softmax attention with no
  dropout on the probabilities (flash-attn is called with dropout_p = 0.), then MDLM's
  `bias_dropout_add_scale`: x + gate * dropout(attn_out(y)), and the same for the GELU-tanh
  MLP -- two residual dropouts per block, attention first;
* final adaLN (shift, scale) + Linear.

The loop is unrolled as the paper defines it: prelude, loop block x S, coda. A key mask
(our choice, docs/design.md: pads are hidden from attention) sets the hidden keys' scores
to -inf before the softmax."""

import math

import pytest
import torch
import torch.nn.functional as F

from loopmdm.config import ModelConfig, load_config
from loopmdm.errors import LoopMDMError
from loopmdm.model.denoiser import LoopedDenoiser

EPS = 1e-3  # MDLM's LogLinearNoise eps (our diffusion.eps default)


# ----------------------------------------------------------------- the reference
def ref_layer_norm(x, weight):
    return F.layer_norm(x.float(), [x.shape[-1]]) * weight[None, None, :]


def ref_modulate(x, shift, scale):
    return x * (1 + scale) + shift


def ref_rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def ref_sigma(t, eps=EPS):
    """MDLM's LogLinearNoise.total_noise."""
    return -torch.log1p(-(1 - eps) * t)


def ref_condition(sd, sigma):
    half = 128  # frequency_embedding_size 256
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = sigma[:, None].float() * freqs[None]
    feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    h = F.silu(F.linear(feats, sd["time_embed.mlp.0.weight"], sd["time_embed.mlp.0.bias"]))
    return F.silu(F.linear(h, sd["time_embed.mlp.2.weight"], sd["time_embed.mlp.2.bias"]))


def ref_block(sd, p, x, cos, sin, c, n_heads, key_mask, dropout, attention_dropout):
    b, s, d = x.shape
    mods = F.linear(c, sd[p + "adaLN_modulation.weight"], sd[p + "adaLN_modulation.bias"])
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:, None].chunk(6, dim=2)
    x_skip = x
    h = ref_modulate(ref_layer_norm(x, sd[p + "norm1.weight"]), shift_msa, scale_msa)
    qkv = F.linear(h, sd[p + "attn.qkv.weight"]).view(b, s, 3, n_heads, d // n_heads)  # 'b s (three h d)'
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (b, s, h, dh)
    q = q * cos[None, :, None, :] + ref_rotate_half(q) * sin[None, :, None, :]
    k = k * cos[None, :, None, :] + ref_rotate_half(k) * sin[None, :, None, :]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // n_heads)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1)
    if attention_dropout:  # not MDLM: only to check the model.attention_dropout option
        probs = F.dropout(probs, dropout, training=True)
    attn = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, d)
    train = dropout > 0
    x = x_skip + gate_msa * F.dropout(F.linear(attn, sd[p + "attn.out.weight"]), dropout, training=train)
    h = ref_modulate(ref_layer_norm(x, sd[p + "norm2.weight"]), shift_mlp, scale_mlp)
    h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"]), approximate="tanh"),
                 sd[p + "mlp.2.weight"], sd[p + "mlp.2.bias"])
    return x + gate_mlp * F.dropout(h, dropout, training=train)


def n_blocks(sd, stage):
    return len({k.split(".")[1] for k in sd if k.startswith(stage + ".")})


def reference_forward(sd, cfg, indices, num_loops, t=None, time_input="sigma", key_mask=None,
                      dropout=0.0, attention_dropout=False):
    """MDLM's DDiT on raw weights. t = None: time-agnostic (sigma = 0)."""
    x = sd["embed.weight"][indices]
    if t is None:
        sigma = torch.zeros(indices.shape[0])
    else:
        sigma = ref_sigma(t) if time_input == "sigma" else 1000.0 * t
    c = ref_condition(sd, sigma)
    dh = cfg.d_model // cfg.n_heads
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, dh, 2).float() / dh))
    freqs = torch.einsum("i,j->ij", torch.arange(indices.shape[1]).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    prefixes = ([f"prelude.{i}." for i in range(n_blocks(sd, "prelude"))]
                + [f"loop_block.{i}." for i in range(n_blocks(sd, "loop_block"))] * num_loops
                + [f"coda.{i}." for i in range(n_blocks(sd, "coda"))])
    for p in prefixes:
        x = ref_block(sd, p, x, cos, sin, c, cfg.n_heads, key_mask, dropout, attention_dropout)
    shift, scale = F.linear(c, sd["head.adaLN_modulation.weight"], sd["head.adaLN_modulation.bias"])[:, None].chunk(2, dim=2)
    h = ref_modulate(ref_layer_norm(x, sd["head.norm.weight"]), shift, scale)
    return F.linear(h, sd["head.linear.weight"], sd["head.linear.bias"])


# ----------------------------------------------------------------- helpers
V, L = 41, 11


def make_model(**overrides):
    torch.manual_seed(0)
    kw = dict(vocab_size=V, n_layers=4, d_model=48, n_heads=4, cond_dim=16, loop_start=1, loop_end=3)
    kw.update(overrides)
    cfg = ModelConfig(**kw)
    model = LoopedDenoiser(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # leave the zero-init regime so every term matters
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def inputs(batch=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V + 1, (batch, L), generator=g)  # includes the mask id V
    t = torch.tensor([0.05, 0.5, 1.0])[:batch]
    return x, t


def raw(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------- eval mode
@pytest.mark.parametrize("num_loops", [1, 3])
def test_eval_logits_match_mdlm_time_agnostic(num_loops):
    """Time-agnostic: MDLM feeds sigma = 0 whatever t the caller passes."""
    model = make_model().eval()
    x, t = inputs()
    with torch.no_grad():
        ours = model(x, num_loops=num_loops, t=t)
    close(ours, reference_forward(raw(model), model.cfg, x, num_loops))


@pytest.mark.parametrize("num_loops", [1, 3])
def test_eval_logits_match_mdlm_time_conditioned_on_sigma(num_loops):
    """Time-conditioned: the embedder sees sigma(t) = -log(1 - (1-eps) t), not t or 1000 t."""
    model = make_model(time_conditioning=True).eval()
    x, t = inputs()
    with torch.no_grad():
        ours = model(x, num_loops=num_loops, t=t)
    close(ours, reference_forward(raw(model), model.cfg, x, num_loops, t=t))


def test_time_input_1000t_option_is_dit_scale():
    model = make_model(time_conditioning=True, time_input="1000t").eval()
    x, t = inputs()
    with torch.no_grad():
        ours = model(x, num_loops=2, t=t)
    close(ours, reference_forward(raw(model), model.cfg, x, 2, t=t, time_input="1000t"))


def test_sigma_follows_the_configured_schedule():
    """validate() hands diffusion.schedule/eps to the model; sigma = -log alpha(t)."""
    cfg = load_config("tiny", ["diffusion.schedule=loglinear", "diffusion.eps=0.01", "model.time_conditioning=true"])
    assert (cfg.model.noise_schedule, cfg.model.noise_eps) == ("loglinear", 0.01)
    model = LoopedDenoiser(ModelConfig(**{**cfg.model.__dict__, "vocab_size": V}))
    t = torch.tensor([0.0, 0.3, 1.0])
    close(model.time_input(t), ref_sigma(t, eps=0.01))
    for name, alpha in (("linear", 1 - t), ("cosine", 1 - torch.cos(0.5 * math.pi * (1 - t)))):
        model = make_model(time_conditioning=True, noise_schedule=name)
        got = model.time_input(t)
        assert torch.isfinite(got).all()  # alpha(1) = 0: capped, not inf
        close(got[:2], -torch.log(alpha[:2]))


# ----------------------------------------------------------------- training mode: dropout placement
@pytest.mark.parametrize("time_conditioning", [False, True])
def test_train_mode_dropout_is_residual_only(time_conditioning):
    """With dropout > 0 in train mode our model draws the same dropout masks as MDLM's
    bias_dropout_add_scale (after attention-out, after the MLP, in that order, every block
    of the unrolled loop) and none on the attention probabilities: with the same seed the
    logits are equal. Dropout on the probabilities, on another tensor or in another order
    draws different masks."""
    p = 0.5
    model = make_model(dropout=p, time_conditioning=time_conditioning).train()
    x, t = inputs()
    sd = raw(model)
    with torch.no_grad():
        torch.manual_seed(123)
        ours = model(x, num_loops=2, t=t)
        torch.manual_seed(123)
        ref = reference_forward(sd, model.cfg, x, 2, t=t if time_conditioning else None, dropout=p)
        torch.manual_seed(124)
        other = reference_forward(sd, model.cfg, x, 2, t=t if time_conditioning else None, dropout=p)
        clean = reference_forward(sd, model.cfg, x, 2, t=t if time_conditioning else None)
    close(ours, ref)
    assert (ref - other).abs().max() > 1e-2 and (ref - clean).abs().max() > 1e-2  # dropout is really on


def test_attention_dropout_option_drops_attention_probabilities():
    """model.attention_dropout=true (the old behaviour, not MDLM) also drops the probabilities."""
    p = 0.5
    model = make_model(dropout=p, attention_dropout=True).train()
    x, _ = inputs()
    sd = raw(model)
    with torch.no_grad():
        torch.manual_seed(7)
        ours = model(x, num_loops=2)
        torch.manual_seed(7)
        ref = reference_forward(sd, model.cfg, x, 2, dropout=p, attention_dropout=True)
    close(ours, ref)


# ----------------------------------------------------------------- key masking (our pad choice)
def test_key_mask_hides_keys_like_minus_inf_scores():
    model = make_model(time_conditioning=True).eval()
    x, t = inputs()
    key_mask = torch.ones(3, L, dtype=torch.bool)
    key_mask[0, 7:] = False  # right padding
    key_mask[1, [2, 5, 6]] = False  # arbitrary hidden keys
    with torch.no_grad():
        ours = model(x, num_loops=3, t=t, key_mask=key_mask)
        unmasked = model(x, num_loops=3, t=t)
    close(ours, reference_forward(raw(model), model.cfg, x, 3, t=t, key_mask=key_mask))
    assert (ours[:2] - unmasked[:2]).abs().max() > 1e-3  # the mask matters
    close(ours[2], unmasked[2])  # an all-visible row is unchanged


def test_pads_do_not_change_other_positions():
    """Hidden keys' token ids do not matter, and a right-padded row gives the logits of the
    unpadded row (RoPE positions are unchanged)."""
    model = make_model().eval()
    x, _ = inputs()
    key_mask = torch.ones(3, L, dtype=torch.bool)
    key_mask[:, 7:] = False
    x2 = x.clone()
    x2[:, 7:] = (x2[:, 7:] + 5) % (V + 1)  # different pad ids
    with torch.no_grad():
        a = model(x, num_loops=2, key_mask=key_mask)
        b = model(x2, num_loops=2, key_mask=key_mask)
        short = model(x[:, :7], num_loops=2)
    close(a[:, :7], b[:, :7])
    close(a[:, :7], short)


# ----------------------------------------------------------------- defaults and validation
def test_defaults_are_mdlm_and_options_are_validated():
    m = ModelConfig()
    assert (m.time_input, m.attention_dropout) == ("sigma", False)
    for preset in ("paper-lm1b", "paper-owt", "paper-fineweb-edu"):
        cfg = load_config(preset)
        assert (cfg.model.time_input, cfg.model.attention_dropout) == ("sigma", False)
    with pytest.raises(LoopMDMError, match=r"^model.time_input='t' is not allowed; choose one of: sigma, 1000t$"):
        load_config("tiny", ["model.time_input=t"])
    with pytest.raises(LoopMDMError) as err:
        LoopedDenoiser(ModelConfig(vocab_size=V, noise_schedule="exp"))
    assert "\n" not in str(err.value) and "model.noise_schedule" in str(err.value)


def test_runs_saved_before_the_options_keep_their_training_behaviour():
    """A run config written before model.time_input existed was trained on 1000·t with
    attention dropout; reopening it must not silently switch to sigma."""
    from loopmdm.config import config_from_dict

    cfg = load_config("tiny")
    old = cfg.to_dict()
    for key in ("time_input", "attention_dropout", "noise_schedule", "noise_eps"):
        del old["model"][key]
    reopened = config_from_dict(old)
    assert (reopened.model.time_input, reopened.model.attention_dropout) == ("1000t", True)
    assert config_from_dict(cfg.to_dict()).model == cfg.model  # new runs round-trip unchanged
