"""MDLM objective: schedules, the forward process, and the NELBO against closed forms."""

import math

import pytest
import torch

from loopmdm.diffusion.objective import diffusion_loss, forward_mask, sample_times, weighted_token_nll
from loopmdm.diffusion.schedule import make_schedule
from loopmdm.errors import LoopMDMError

V = 5


class FixedLogits(torch.nn.Module):
    """A 'denoiser' that returns given logits whatever its input, and records its input."""

    mask_id = V

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.seen = None

    def forward(self, x, num_loops=1, t=None, key_mask=None):
        self.seen = x.clone()
        return self.logits


@pytest.mark.parametrize("name", ["loglinear", "linear", "cosine"])
def test_schedule_endpoints_and_weight_is_minus_alpha_prime_over_one_minus_alpha(name):
    sched = make_schedule(name, eps=1e-3)
    assert float(sched.alpha(torch.tensor(0.0))) == pytest.approx(1.0)
    assert float(sched.alpha(torch.tensor(1.0))) == pytest.approx(0.0, abs=1.1e-3)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64, requires_grad=True)
    alpha = sched.alpha(t)
    (grad,) = torch.autograd.grad(alpha.sum(), t)
    torch.testing.assert_close(sched.alpha_prime(t.detach()), grad)
    torch.testing.assert_close(sched.loss_weight(t.detach()), -grad / (1 - alpha.detach()))
    assert torch.all(torch.diff(sched.mask_prob(t.detach())) > 0)  # masking increases with t


def test_loglinear_weight_is_one_over_t():
    t = torch.tensor([0.01, 0.3, 1.0])
    torch.testing.assert_close(make_schedule("loglinear").loss_weight(t), 1 / t)


def test_unknown_schedule():
    with pytest.raises(LoopMDMError, match="'sqrt'"):
        make_schedule("sqrt")


def test_antithetic_times_are_stratified():
    g = torch.Generator().manual_seed(0)
    t = sample_times(8, eps=0.0, antithetic=True, generator=g)
    strata = torch.floor(t * 8).long()
    assert torch.equal(strata, torch.arange(8))
    t = sample_times(1000, eps=1e-3, antithetic=False, generator=g)
    assert t.min() >= 1e-3 and t.max() <= 1.0


def test_forward_mask_rate_and_pads():
    sched = make_schedule("loglinear", 1e-3)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, V, (4, 20000))
    t = torch.tensor([0.1, 0.4, 0.7, 1.0])
    x_t, masked = forward_mask(x0, t, sched, V, g)
    torch.testing.assert_close(masked.float().mean(1), sched.mask_prob(t), atol=0.01, rtol=0)
    assert torch.equal(x_t[masked], torch.full_like(x_t[masked], V))
    assert torch.equal(x_t[~masked], x0[~masked])
    valid = torch.ones_like(x0, dtype=torch.bool)
    valid[:, 10000:] = False
    _, masked = forward_mask(x0, t, sched, V, g, valid)
    assert not masked[:, 10000:].any()


def test_loss_matches_closed_form_on_hand_built_case():
    """Two sequences of 3 tokens, fixed logits, masks chosen by hand:
    loss = sum over masked (1/t) * -log softmax(logits)[x0] / number of tokens."""
    sched = make_schedule("loglinear", 1e-3)
    logits = torch.log(torch.tensor([
        [[0.5, 0.2, 0.1, 0.1, 0.1], [0.1, 0.6, 0.1, 0.1, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2]],
        [[0.7, 0.1, 0.1, 0.05, 0.05], [0.25, 0.25, 0.25, 0.125, 0.125], [0.1, 0.1, 0.1, 0.1, 0.6]],
    ]))
    x0 = torch.tensor([[0, 1, 3], [0, 4, 4]])
    masked = torch.tensor([[True, False, True], [False, True, True]])
    t = torch.tensor([0.5, 0.25])
    terms = weighted_token_nll(logits, x0, masked, t, sched)
    expected = (2 * -math.log(0.5) + 2 * -math.log(0.2) + 4 * -math.log(0.125) + 4 * -math.log(0.6)) / 6
    assert float(terms.sum() / 6) == pytest.approx(expected, rel=1e-6)


def test_diffusion_loss_end_to_end_closed_form():
    """t = 1 with eps = 0 masks everything: loss = mean over tokens of -log p(x0) (weight 1)."""
    sched = make_schedule("linear")
    logits = torch.log_softmax(torch.randn(2, 4, V, generator=torch.Generator().manual_seed(0)), -1)
    model = FixedLogits(logits)
    x0 = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(1))
    out = diffusion_loss(model, x0, sched, num_loops=1, eps=0.0, t=torch.ones(2))
    assert torch.equal(model.seen, torch.full_like(x0, V))
    expected = -logits.gather(-1, x0[..., None]).mean()
    torch.testing.assert_close(out.loss, expected)
    assert out.num_tokens == 8 and int(out.num_masked) == 8


def test_unmasked_tokens_contribute_exactly_zero():
    sched = make_schedule("loglinear")
    x0 = torch.randint(0, V, (3, 6))
    masked = torch.zeros(3, 6, dtype=torch.bool)
    masked[:, ::2] = True
    t = torch.tensor([0.2, 0.5, 0.9])
    logits = torch.randn(3, 6, V)
    terms = weighted_token_nll(logits, x0, masked, t, sched)
    assert torch.count_nonzero(terms[~masked]) == 0
    # Changing the logits at unmasked positions, even wildly, leaves the loss unchanged.
    other = logits.clone()
    other[~masked] = 1e4 * torch.randn_like(other[~masked])
    assert torch.equal(weighted_token_nll(other, x0, masked, t, sched).sum(), terms.sum())


def test_padding_is_excluded_from_loss_and_count():
    sched = make_schedule("linear")
    logits = torch.zeros(1, 4, V)
    model = FixedLogits(logits)
    x0 = torch.tensor([[1, 2, 0, 0]])
    valid = torch.tensor([[True, True, False, False]])
    out = diffusion_loss(model, x0, sched, num_loops=1, eps=0.0, t=torch.ones(1), valid=valid)
    assert out.num_tokens == 2 and int(out.num_masked) == 2
    torch.testing.assert_close(out.loss, torch.tensor(math.log(V)))
