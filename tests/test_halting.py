"""Adaptive halting rules: each rule's signal on hand-built cases, halting that differs between
calls built to differ (and over a real sampling run), and reference rows spread over the split."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from loopmdm.config import ModelConfig, load_config
from loopmdm.errors import LoopMDMError
from loopmdm.evaluation.sample_bench import infill_template, parse_rules, reference_quality, reference_rows
from loopmdm.sampling.generate import SamplerSpec, generate
from loopmdm.sampling.halting import HALT_RULES, Halting, LoopStep
from loopmdm.sampling.loop_runner import LoopRunner

V = 4  # vocabulary of the stub; mask id = 4


class ContractingStub(nn.Module):
    """A deterministic looped denoiser whose loop provably needs more iterations when more of
    the row is masked. Hidden size = vocabulary = 4, logits = 5 * H.

    A known token v sits at its fixed point e_v (it never changes). A masked position starts at
    e_1 and contracts towards e_0: H^k = e_0 + r (H^{k-1} - e_0) with r = 0.3 + 0.6 * m, m the
    row's masked fraction -- a crowded row (early step) converges slowly, a nearly finished row
    (late step) fast. Its top-1 prediction flips from 1 to 0 once r^k < 1/2."""

    def __init__(self):
        super().__init__()
        self.cfg = ModelConfig(vocab_size=V, n_layers=3, d_model=4, n_heads=1, cond_dim=4, loop_start=1,
                               loop_end=2, max_train_loops=4)
        self.mask_id = V
        self.is_looped = True
        self.coda = nn.ModuleList()

    def condition(self, t, batch, device):
        return None

    def run_prelude(self, x, c, key_mask=None):
        masked = x == self.mask_id
        self._rate = (0.3 + 0.6 * masked.float().mean(1))[:, None, None]  # (B, 1, 1)
        self._target = torch.where(masked[..., None], nn.functional.one_hot(torch.zeros_like(x), V).float(),
                                   nn.functional.one_hot(x.clamp(max=V - 1), V).float())
        return torch.where(masked[..., None], nn.functional.one_hot(torch.ones_like(x), V).float(), self._target)

    def iterate_loop(self, h0, c, key_mask=None, num_loops=None, h_start=None, merge=None, step=None):
        h, k = (h0 if h_start is None else h_start), 0
        while num_loops is None or k < num_loops:
            h_prev = h
            h = self._target + self._rate * (h - self._target)
            k += 1
            if merge is not None:
                h = merge(k, h_prev, h)
            yield h

    def run_coda(self, h, c, key_mask=None):
        return 5.0 * h


def _row(num_masked: int, L: int = 16) -> torch.Tensor:
    x = torch.arange(L) % V
    x[:num_masked] = V
    return x[None]


ADAPTIVE = [("change", 0.05), ("change-masked", 0.05), ("change-scaled", 0.05), ("kl", 1e-3)]


@pytest.mark.parametrize("rule,tau", ADAPTIVE)
def test_halting_differs_between_calls_built_to_differ(rule, tau):
    """Two calls that differ only in how much is masked: a rule that halts both at the same
    loop count (a fixed S in disguise) fails here."""
    runner = LoopRunner(ContractingStub(), halting=Halting(tau, 1, "call", rule))
    t = torch.ones(1)
    runner(_row(2), 32, t)
    runner(_row(14), 32, t)
    few, many = (r.loops for r in runner.records)
    assert few < many < 32, (rule, few, many)
    assert [r.masked for r in runner.records] == [2 / 16, 14 / 16]


def test_fixed_schedule_does_not_adapt_on_the_same_calls():
    """The control: without halting both calls run the cap -- the check above can fail."""
    runner = LoopRunner(ContractingStub())
    runner(_row(2), 7, torch.ones(1))
    runner(_row(14), 7, torch.ones(1))
    assert [r.loops for r in runner.records] == [7, 7]


def test_halting_spreads_over_a_sampling_run_and_follows_the_masked_fraction():
    """A real sampling run (ancestral, 8 steps) on the stub: the calls' loop counts spread, the
    records carry t, the masked fraction and the step, and more masks never mean fewer loops."""
    cfg = load_config(None, ["train.precision=fp32", "train.device=cpu"])
    model = ContractingStub()
    template = torch.full((2, 16), V)
    spec = SamplerSpec("32", Halting(0.05, 1, "call", "change-masked"))
    steps_seen = []
    _, stats = generate(model, cfg, template, spec, steps=8, sampler="ancestral", seed=0,
                        on_step=lambda i, x: steps_seen.append(i))
    assert len(stats["loops_hist"]) >= 3, stats["loops_hist"]
    calls = list(zip(stats["call_masked"], stats["call_loops"], stats["call_step"], stats["call_t"]))
    assert len(calls) == stats["calls"] and stats["call_step"] == sorted(stats["call_step"])
    assert calls[0][0] == 1.0 and calls[0][2] == 0 and calls[0][3] == pytest.approx(1.0)
    by_masked = sorted(calls)
    assert all(a[1] <= b[1] for a, b in zip(by_masked, by_masked[1:])), by_masked


# ----------------------------------------------------------------- each rule's signal by hand
def _step(**kw):
    h_prev = torch.ones(2, 4, 3)
    h_new = h_prev * torch.tensor([1.1, 1.0, 1.0, 1.5])[None, :, None]  # changes 0.1, 0, 0, 0.5
    masked = torch.tensor([[True, False, False, False], [True, True, True, True]])
    return LoopStep(h_prev, h_new, masked, **kw)


def test_change_rules_by_hand():
    step = _step()
    change, counted = HALT_RULES["change"].signal(step)
    assert torch.allclose(change, torch.tensor([[0.1, 0, 0, 0.5]] * 2)) and bool(counted.all())
    _, counted = HALT_RULES["change-masked"].signal(step)
    assert torch.equal(counted, step.masked)
    # change-scaled: tau / m with m = 1/4 (row 0) and 1 (row 1)
    score, _ = Halting(0.2, rule="change-scaled").scores(step)
    assert torch.allclose(score[0], torch.tensor([0.1, 0, 0, 0.5]) / 0.8)
    assert torch.allclose(score[1], torch.tensor([0.1, 0, 0, 0.5]) / 0.2)


def test_prediction_rules_by_hand():
    p_prev = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1]])
    p_new = torch.tensor([[0.6, 0.3, 0.1], [0.6, 0.3, 0.1]])
    lp, ln = (p.log().expand(2, 2, 3) for p in (p_prev, p_new))  # (B=2, L=2, V=3)
    step = LoopStep(torch.ones(2, 2, 1), torch.ones(2, 2, 1), torch.tensor([[True, True], [True, False]]), lp, ln)
    flips, counted = HALT_RULES["flips"].signal(step)
    assert torch.equal(flips, torch.tensor([[0.0, 1.0], [0.0, 1.0]])) and torch.equal(counted, step.masked)
    kl, _ = HALT_RULES["kl"].signal(step)
    want = [sum(a * math.log(a / b) for a, b in zip(p_new[i].tolist(), p_prev[i].tolist())) for i in range(2)]
    assert torch.allclose(kl, torch.tensor([want, want]), atol=1e-6)
    # call granularity: mean flip fraction over the 3 masked positions = 1/3
    active = torch.ones(2, 2, dtype=torch.bool)
    assert not Halting(0.34, rule="flips").still_active(step, active).any()
    assert Halting(0.33, rule="flips").still_active(step, active).all()


def test_granularities_by_hand():
    step = _step()  # row 0: one masked position (change 0.1); row 1: all masked, mean 0.15
    active = torch.ones(2, 4, dtype=torch.bool)
    seq = Halting(0.12, granularity="sequence", rule="change-masked").still_active(step, active)
    assert torch.equal(seq, torch.tensor([[False] * 4, [True] * 4]))
    tok = Halting(0.3, granularity="token", rule="change-masked").still_active(step, active)
    # row 1: only the position that moved by 0.5 keeps looping; row 0: its one masked
    # position converged, so its unmasked positions (not read by the rule) stop with it
    assert torch.equal(tok, torch.tensor([[False] * 4, [False, False, False, True]]))
    tok = Halting(0.05, granularity="token", rule="change-masked").still_active(step, active)
    assert torch.equal(tok[0], torch.tensor([True, True, True, True]))  # unmasked follow their active row


def test_halting_and_rule_spellings_are_checked():
    with pytest.raises(LoopMDMError, match="rule 'nope'"):
        Halting(0.1, rule="nope")
    with pytest.raises(LoopMDMError, match="cap"):
        Halting(0.1, min_loops=3, cap=2)
    assert parse_rules("kl:0.01:0.001, change-masked:0.1") == [("kl", [0.01, 0.001]), ("change-masked", [0.1])]
    for bad in ("nope:0.1", "kl", "kl:x", "kl:-1"):
        with pytest.raises(LoopMDMError, match="--rules"):
            parse_rules(bad)


def test_cap_limits_the_loops():
    runner = LoopRunner(ContractingStub(), halting=Halting(1e-12, 1, "call", "change", cap=3))
    runner(_row(14), 32, torch.ones(1))
    assert runner.records[-1].loops == 3


# ----------------------------------------------------------------- reference rows
def test_reference_and_infill_rows_are_spread_over_the_split():
    blocks = np.repeat(np.arange(100, dtype=np.int64)[:, None], 8, axis=1)  # row i holds the token i
    ids = reference_rows(blocks, 5)[:, 0].tolist()
    assert ids[0] == 0 and ids[-1] == 99 and len(set(ids)) == 5, ids  # not rows 0..4
    assert reference_quality(None, blocks, 5, None)["entropy"] == pytest.approx(0.0)
    _, truth = infill_template(blocks, 5, mask_id=100)
    assert truth[:, 0].tolist() == ids
    assert reference_rows(blocks, 300).shape[0] == 100  # more than the split: all of it


# ----------------------------------------------------------------- per-token skipping
def _real_model(block: str, loop_layers: int) -> "LoopedDenoiser":
    from loopmdm.model.denoiser import LoopedDenoiser

    torch.manual_seed(0)
    model = LoopedDenoiser(ModelConfig(vocab_size=20, n_layers=2 + loop_layers, d_model=32, n_heads=2, cond_dim=16,
                                       block=block, loop_start=1, loop_end=1 + loop_layers, max_train_loops=4)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


@pytest.mark.parametrize("block", ["dit", "llama"])
@pytest.mark.parametrize("loop_layers", [1, 2])
def test_loop_step_at_equals_the_dense_step_and_freezes_the_rest(block, loop_layers):
    model = _real_model(block, loop_layers)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 21, (3, 12), generator=g)
    with torch.no_grad():
        c = model.condition(torch.full((3,), 0.4), 3, x.device)
        h = model.run_prelude(x, c)
        everyone = torch.ones(3, 12, dtype=torch.bool)
        assert (model.loop_step_at(h, c, everyone) - model.loop_step(h, c)).abs().max() < 1e-6
        active = torch.rand(3, 12, generator=g) < 0.4
        active[2] = False  # a row with nothing active
        out = model.loop_step_at(h, c, active)
        assert torch.equal(out[~active], h[~active])  # frozen states do not move
        # Dense reference of the same semantics: every layer on every position, frozen ones reset.
        ref = h
        for layer in model.loop_block:
            ref = torch.where(active[..., None], layer(ref, c, model.rotary), h)
        assert (out - ref).abs().max() < 1e-5


def test_token_halting_skipping_matches_the_dense_loop():
    """A one-layer loop block: skipping frozen tokens changes the cost, not the result."""
    model = _real_model("dit", 1)
    x = torch.randint(0, 21, (2, 12), generator=torch.Generator().manual_seed(1))
    t = torch.full((2,), 0.5)
    with torch.no_grad():
        c = model.condition(t, 2, x.device)
        h0 = model.run_prelude(x, c)
        states = list(model.iterate_loop(h0, c, None, 12))
        changes = torch.stack([(h - p).norm(dim=-1) / p.norm(dim=-1) for h, p in zip(states, [h0] + states[:-1])])
    tau = float(changes[2].median())
    fast = LoopRunner(model, halting=Halting(tau, 1, "token"))
    dense = LoopRunner(model, halting=Halting(tau, 1, "token"), skip_frozen=False)
    with torch.no_grad():
        assert (fast(x, 12, t) - dense(x, 12, t)).abs().max() < 1e-5
    assert fast.records[0].row_loops == dense.records[0].row_loops
    assert min(fast.records[0].row_loops) < fast.records[0].loops
