"""The analytic FLOPs counter against torch's FlopCounterMode on tiny configs."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from loopmdm.config import ModelConfig
from loopmdm.model import flops
from loopmdm.model.denoiser import LoopedDenoiser


def cfg_for(block, looped=True, **kw):
    loop = dict(loop_start=1, loop_end=3) if looped else dict(loop_start=None, loop_end=None)
    return ModelConfig(block=block, vocab_size=97, n_layers=4, d_model=64, n_heads=4, cond_dim=32,
                       max_train_loops=4, time_conditioning=block == "dit", **loop, **kw)


def measured(model, num_loops, backward):
    x = torch.randint(0, model.mask_id + 1, (2, 32), generator=torch.Generator().manual_seed(0))
    # The math SDPA backend expresses attention as matmuls, which the counter sees.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(x, num_loops=num_loops, t=torch.rand(2))
        if backward:
            out.float().sum().backward()
    return counter.get_total_flops() / 2  # per sequence


@pytest.mark.parametrize("block", ["dit", "llama"])
@pytest.mark.parametrize("looped,num_loops", [(False, 1), (True, 1), (True, 3)])
def test_forward_and_training_flops_match_flop_counter(block, looped, num_loops):
    cfg = cfg_for(block, looped)
    model = LoopedDenoiser(cfg)
    fwd = measured(model, num_loops, backward=False)
    assert fwd == pytest.approx(flops.forward_flops(cfg, 32, num_loops), rel=0.02)
    total = measured(model, num_loops, backward=True)
    assert total == pytest.approx(flops.train_flops(cfg, 32, num_loops), rel=0.02)


def test_truncated_gradients_are_charged_forward_only():
    cfg = cfg_for("llama", grad_loops=1)
    model = LoopedDenoiser(cfg).train()
    assert measured(model, 4, backward=True) == pytest.approx(flops.train_flops(cfg, 32, 4), rel=0.02)
    assert flops.train_flops(cfg, 32, 4) < flops.train_flops(cfg_for("llama"), 32, 4)


def test_paper_formula_extra_cost_per_loop():
    """F(S) = F_base + (S - 1) * n_loop_layers * F_layer (paper's FLOPs accounting)."""
    cfg = cfg_for("dit")
    base = flops.train_flops(cfg, 128, 1)
    layer = 3 * flops.layer_flops(cfg, 128)
    for s in (2, 5, 12):
        assert flops.train_flops(cfg, 128, s) == pytest.approx(base + (s - 1) * 2 * layer)
    expected = sum(flops.train_flops(cfg, 128, s) for s in range(1, 5)) / 4
    assert flops.expected_train_flops(cfg, 128) == pytest.approx(expected)


def test_param_counts_match_the_model():
    cfg = cfg_for("dit")
    model = LoopedDenoiser(cfg)
    params, non_embedding = flops.count_params(cfg)
    assert params == sum(p.numel() for p in model.parameters())
    assert non_embedding == params - 98 * 64 - 64 * 97
