"""Validation NELBO: seeded, paired across loop counts, averaged over draws."""

import math

import numpy as np
import pytest
import torch

from loopmdm.config import ModelConfig
from loopmdm.diffusion.schedule import make_schedule
from loopmdm.evaluation.nelbo import evaluate_nelbo
from loopmdm.model.denoiser import LoopedDenoiser

V = 23


class Uniform(torch.nn.Module):
    """Predicts the uniform distribution: the NELBO is exactly log V in expectation."""

    mask_id = V
    is_looped = False

    def forward(self, x, num_loops=1, t=None, key_mask=None):
        return torch.zeros(*x.shape, V)


def test_uniform_model_nelbo_is_log_vocab():
    blocks = np.random.default_rng(0).integers(0, V, (256, 64)).astype(np.uint16)
    # E_t[ weight(t) * P(masked | t) ] = 1 per token, so NELBO = log V on average over many draws.
    r = evaluate_nelbo(Uniform(), blocks, make_schedule("loglinear", 1e-3), [1], eps=1e-3, batch_size=64, draws=8)[0]
    assert r["nll"] == pytest.approx(math.log(V), rel=0.02)
    assert r["tokens"] == 256 * 64 and r["draws"] == 8 and r["ppl"] == pytest.approx(math.exp(r["nll"]))


def test_eval_is_seeded_and_paired_across_loop_counts():
    torch.manual_seed(0)
    model = LoopedDenoiser(ModelConfig(vocab_size=V, n_layers=3, d_model=16, n_heads=2, cond_dim=8,
                                       loop_start=1, loop_end=2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    blocks = np.random.default_rng(1).integers(0, V, (40, 16)).astype(np.uint16)
    sched = make_schedule("loglinear")
    a = evaluate_nelbo(model, blocks, sched, [1, 3], eps=1e-3, batch_size=16, seed=7)
    b = evaluate_nelbo(model, blocks, sched, [3, 1], eps=1e-3, batch_size=16, seed=7)
    assert a[0]["nll"] == b[1]["nll"] and a[1]["nll"] == b[0]["nll"]  # same draws for every S
    assert a[0]["nll"] != a[1]["nll"]  # the loop count matters
    c = evaluate_nelbo(model, blocks, sched, [1], eps=1e-3, batch_size=16, seed=8)
    assert c[0]["nll"] != a[0]["nll"]  # a different seed gives different draws
    assert a[0]["sequences"] == 40  # the last partial batch is included


def test_nelbo_by_t_bins_recombines_to_the_overall_bound():
    """by_t splits the same draws by noise level: token-weighted, the bins give back the total."""
    import numpy as np
    import torch

    from loopmdm.config import ModelConfig
    from loopmdm.diffusion.schedule import make_schedule
    from loopmdm.evaluation.nelbo import evaluate_nelbo
    from loopmdm.model.denoiser import LoopedDenoiser

    torch.manual_seed(0)
    model = LoopedDenoiser(ModelConfig(vocab_size=30, n_layers=2, d_model=32, n_heads=2, cond_dim=8,
                                       loop_start=0, loop_end=1))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    blocks = np.random.default_rng(0).integers(0, 30, (64, 12))
    edges = [0.0, 0.25, 0.5, 0.75, 1.0]
    plain = evaluate_nelbo(model, blocks, make_schedule("loglinear", 1e-3), [1, 3], eps=1e-3, batch_size=16)
    binned = evaluate_nelbo(model, blocks, make_schedule("loglinear", 1e-3), [1, 3], eps=1e-3, batch_size=16, t_bins=edges)
    for a, b in zip(plain, binned):
        assert a["nll"] == b["nll"]  # the same draws
        per_bin = list(b["by_t"].values())
        assert len(per_bin) == 4 and all(v is not None for v in per_bin)
        # antithetic t: each batch of 16 puts 4 sequences in each bin, all of length 12
        assert np.mean(per_bin) == pytest.approx(b["nll"], rel=1e-6)  # per-row sums are float32
