import math

import pytest
import torch

from loopmdm.diffusion.schedule import make_schedule
from loopmdm.errors import LoopMDMError
from loopmdm.sampling.loop_schedule import ConstantLoops, LinearLoops, LoopSchedule, as_loop_schedule
from loopmdm.sampling.samplers import SampleResult, _gumbel, decode_samples, num_transfer_tokens, sample

V, L, B = 11, 16, 3
MASK = V
SAMPLERS = ["ancestral", "cache", "confidence"]


class LinearDenoiser:
    """Deterministic, context-dependent fake: logits[b, l] = sum_j W[l, j, x[b, j]] + loops * bias[l].
    Records every call (input, loops, t)."""

    def __init__(self, seed=0, scale=1.5, bias_scale=0.3):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(L, L, V + 1, V, generator=g) * scale / math.sqrt(L)
        self.bias = torch.randn(L, V, generator=g) * bias_scale
        self.calls = []

    def __call__(self, x, num_loops, t):
        assert x.dtype == torch.long and t.shape == (x.shape[0],) and t.dtype == torch.float32
        self.calls.append((x.clone(), num_loops, t.clone()))
        onehot = torch.nn.functional.one_hot(x, V + 1).float()
        return torch.einsum("bjc,ljcv->blv", onehot, self.W[: x.shape[1], : x.shape[1]]) + num_loops * self.bias[: x.shape[1]]


class FixedDenoiser:
    """Logits depend on position only (so p is known exactly)."""

    def __init__(self, logits):
        self.logits = logits  # (L, V)
        self.calls = 0

    def __call__(self, x, num_loops, t):
        self.calls += 1
        return self.logits[: x.shape[1]].expand(x.shape[0], -1, -1).clone()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def templates():
    g = gen(123)
    clean = torch.randint(0, V, (B, L), generator=g)
    prefix = clean.clone()
    prefix[:, 5:] = MASK  # prefix prompt
    infill = clean.clone()
    infill[0, 3:9] = MASK  # different holes per row
    infill[1, ::2] = MASK
    infill[2, 10:] = MASK
    infill[2, 0] = MASK
    return {"prefix": prefix, "infill": infill, "all_mask": torch.full((B, L), MASK)}


def run(sampler, x_init=None, steps=8, loops=2, seed=0, den=None, **kw):
    den = den or LinearDenoiser()
    kw.setdefault("schedule", make_schedule("loglinear"))
    if x_init is None:
        kw.setdefault("seq_len", L)
        kw.setdefault("batch_size", B)
    return sample(den, mask_id=MASK, x_init=x_init, steps=steps, loops=loops, sampler=sampler, generator=gen(seed), **kw)


# ----------------------------------------------------------------------------- loop schedules


def test_loop_schedules():
    assert ConstantLoops(3).num_loops(0, 10, 1.0) == 3 and ConstantLoops(3).num_loops(9, 10, 0.1) == 3
    lin = LinearLoops(2, 8)
    assert [lin.num_loops(i, 5, 0.5) for i in range(5)] == [2, 4, 5, 7, 8]  # 2, 3.5, 5, 6.5, 8 rounded half up
    assert [LinearLoops(12, 4).num_loops(i, 3, 0.5) for i in range(3)] == [12, 8, 4]
    assert LinearLoops(3, 9).num_loops(0, 1, 1.0) == 3
    assert as_loop_schedule(4) == ConstantLoops(4)
    assert as_loop_schedule(lin) is lin
    for bad in (0, -1, True, 2.5):
        with pytest.raises(LoopMDMError, match=str(bad)):
            ConstantLoops(bad)
    with pytest.raises(LoopMDMError, match="start"):
        LinearLoops(0, 3)
    with pytest.raises(LoopMDMError, match="'x'"):
        as_loop_schedule("x")
    with pytest.raises(LoopMDMError, match="0"):
        as_loop_schedule(0)


# ----------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("kind", ["prefix", "infill", "all_mask"])
def test_fixed_positions_kept_and_no_mask_left(sampler, kind):
    x_init = templates()[kind]
    for temperature in (1.0, 0.0):
        res = run(sampler, x_init=x_init, steps=6, temperature=temperature)
        assert isinstance(res, SampleResult)
        assert res.tokens.shape == x_init.shape and res.tokens.dtype == torch.long
        keep = x_init != MASK
        assert torch.equal(res.tokens[keep], x_init[keep])
        assert (res.tokens >= 0).all() and (res.tokens < V).all()
        assert res.nfe == len(res.loops_per_call) and res.loop_passes == sum(res.loops_per_call)
    assert (x_init == MASK).sum() > 0


def test_x_init_not_mutated_and_no_masks_means_no_calls():
    x_init = templates()["prefix"]
    before = x_init.clone()
    run("ancestral", x_init=x_init)
    assert torch.equal(x_init, before)
    clean = torch.randint(0, V, (B, L), generator=gen(5))
    for sampler in SAMPLERS:
        res = run(sampler, x_init=clean)
        assert torch.equal(res.tokens, clean) and res.nfe == 0


def test_shape_from_seq_len_and_batch_size():
    res = run("ancestral", seq_len=7, batch_size=2)
    assert res.tokens.shape == (2, 7)


# ----------------------------------------------------------------------------- cache sampler


@pytest.mark.parametrize("kind", ["prefix", "infill", "all_mask"])
@pytest.mark.parametrize("steps", [5, 40, 200])
def test_cache_matches_ancestral_with_fewer_calls(kind, steps):
    x_init = templates()[kind]
    anc = run("ancestral", x_init=x_init, steps=steps, seed=7)
    cac = run("cache", x_init=x_init, steps=steps, seed=7)
    assert torch.equal(anc.tokens, cac.tokens)
    assert cac.nfe <= anc.nfe
    if steps >= 200:  # far more steps than maskable positions: most steps change nothing
        assert cac.nfe < anc.nfe
        assert cac.nfe <= int((x_init == MASK).sum()) + 1


def test_cache_matches_ancestral_with_changing_loops():
    # the cache must not reuse logits computed with a different loop count
    loops = LinearLoops(1, 6)
    den_a, den_c = LinearDenoiser(bias_scale=5.0), LinearDenoiser(bias_scale=5.0)
    anc = run("ancestral", steps=100, loops=loops, seed=3, den=den_a)
    cac = run("cache", steps=100, loops=loops, seed=3, den=den_c)
    # every (state, loops) prediction ancestral used was also computed by cache, none reused across loop counts
    def key(calls):
        return {(tuple(x.flatten().tolist()), n) for x, n, _ in calls}
    assert key(den_a.calls) == key(den_c.calls)
    assert torch.equal(anc.tokens, cac.tokens) and cac.nfe < anc.nfe
    assert set(cac.loops_per_call) <= set(anc.loops_per_call) and len(set(cac.loops_per_call)) > 1


def test_cache_rejects_time_dependent_denoiser():
    with pytest.raises(LoopMDMError, match="time_agnostic"):
        run("cache", time_agnostic=False)
    run("ancestral", time_agnostic=False)  # fine


# ----------------------------------------------------------------------------- loop schedule reaches the denoiser


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_loops_reach_denoiser(sampler):
    den = LinearDenoiser()
    res = run(sampler, steps=6, loops=ConstantLoops(5), den=den)
    assert [c[1] for c in den.calls] == res.loops_per_call == [5] * res.nfe
    assert res.loop_passes == 5 * res.nfe and res.nfe >= 1

    den = LinearDenoiser()
    sched = LinearLoops(2, 12)
    steps = 6
    res = run(sampler, steps=steps, loops=sched, den=den)
    seen = [c[1] for c in den.calls]
    assert seen == res.loops_per_call and res.loop_passes == sum(seen)
    # each call's loops equal the schedule at that call's step (identified by its t on the grid)
    grid = torch.linspace(1.0, 1e-5, steps + 1)
    for _, n, t in den.calls:
        step = int((grid - t[0]).abs().argmin())
        assert n == sched.num_loops(min(step, steps - 1), steps, float(t[0]))
    if sampler == "confidence":  # all-mask, L >= steps: one call per step
        assert seen == [sched.num_loops(i, steps, 0.0) for i in range(steps)]


def test_custom_schedule_sees_step_and_t():
    class Recording(LoopSchedule):
        def __init__(self):
            self.seen = []

        def num_loops(self, step, num_steps, t):
            self.seen.append((step, num_steps, t))
            return 1 + step

    sched = Recording()
    res = run("confidence", steps=4, loops=sched)
    assert [s[0] for s in sched.seen] == [0, 1, 2, 3] and all(s[1] == 4 for s in sched.seen)
    assert [s[2] for s in sched.seen] == pytest.approx([1.0, 0.75 + 0.25e-5, 0.5 + 0.5e-5, 0.25 + 0.75e-5])
    assert res.loops_per_call == [1, 2, 3, 4]

    class Bad(LoopSchedule):
        def num_loops(self, step, num_steps, t):
            return 0

    with pytest.raises(LoopMDMError, match="returned 0"):
        run("ancestral", loops=Bad())


# ----------------------------------------------------------------------------- confidence sampler


def test_num_transfer_tokens():
    k = num_transfer_tokens(torch.tensor([10, 3, 0, 7]), 4)
    assert k.tolist() == [[3, 3, 2, 2], [1, 1, 1, 0], [0, 0, 0, 0], [2, 2, 2, 1]]


@pytest.mark.parametrize("kind", ["prefix", "infill", "all_mask"])
def test_confidence_commits_k_most_confident(kind):
    x_init = templates()[kind]
    steps = 5
    den = LinearDenoiser()
    res = run("confidence", x_init=x_init, steps=steps, temperature=0.0, den=den)
    k = num_transfer_tokens((x_init == MASK).sum(1), steps)
    states = [c[0] for c in den.calls] + [res.tokens]
    assert len(den.calls) == steps  # every step commits something here
    assert torch.equal(states[0], x_init)
    for i, (x, _, _) in enumerate(den.calls):
        nxt = states[i + 1]
        masked = x == MASK
        committed = masked & (nxt != MASK)
        assert committed.sum(1).tolist() == k[:, i].tolist()
        assert torch.equal(nxt[~masked], x[~masked])  # nothing else changes
        p = torch.softmax(den(x, 2, torch.ones(B)).double(), -1)
        den.calls.pop()
        conf, best = p.max(-1)
        assert torch.equal(nxt[committed], best[committed])  # temperature 0: argmax token
        for b in range(B):
            if committed[b].any() and (masked[b] & ~committed[b]).any():
                assert conf[b][committed[b]].min() >= conf[b][masked[b] & ~committed[b]].max()


def test_confidence_skips_empty_steps():
    x_init = templates()["infill"]  # at most 8 masked positions per row
    res = run("confidence", x_init=x_init, steps=30)
    assert res.nfe == int((x_init == MASK).sum(1).max())


# ----------------------------------------------------------------------------- temperature / determinism


@pytest.mark.parametrize("kind", ["prefix", "all_mask"])
def test_temperature_zero_deterministic(kind):
    x_init = templates()[kind]
    a = run("confidence", x_init=x_init, temperature=0.0, seed=1)
    b = run("confidence", x_init=x_init, temperature=0.0, seed=2)
    assert torch.equal(a.tokens, b.tokens)
    # ancestral: the unmask order stays random, but with position-only logits the tokens are argmax
    logits = torch.randn(L, V, generator=gen(9))
    outs = [run(s, x_init=x_init, temperature=0.0, seed=seed, den=FixedDenoiser(logits)).tokens for s in ("ancestral", "cache") for seed in (1, 2)]
    expect = torch.where(x_init == MASK, logits.argmax(-1).expand(B, L), x_init)
    assert all(torch.equal(o, expect) for o in outs)


def test_same_seed_same_tokens_different_seed_differs():
    for sampler in SAMPLERS:
        a, b, c = (run(sampler, steps=6, seed=s).tokens for s in (4, 4, 5))
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_gumbel_is_float64():
    g = _gumbel((1000,), gen(0), torch.device("cpu"))
    assert g.dtype == torch.float64 and torch.isfinite(g).all()
    assert abs(g.mean().item() - 0.5772) < 0.1  # Euler-Mascheroni


def chi_square(tokens, probs):
    """Pearson statistic over positions: tokens (N, L), probs (L, V)."""
    n = tokens.shape[0]
    counts = torch.nn.functional.one_hot(tokens, V).sum(0).double()  # (L, V)
    expected = n * probs
    return float(((counts - expected) ** 2 / expected).sum()), probs.shape[0] * (V - 1)


@pytest.mark.parametrize("sampler,steps,temperature", [("ancestral", 1, 1.0), ("ancestral", 10, 0.7), ("cache", 10, 1.0), ("confidence", 1, 1.3)])
def test_sampling_distribution_matches_p(sampler, steps, temperature):
    # confidence only with one step: committing the most confident positions first is
    # (by design) not distribution-preserving per position when steps > 1
    logits = torch.randn(L, V, generator=gen(11)) * 1.5
    probs = torch.softmax(logits.double() / temperature, -1)
    n = 4000
    res = run(sampler, steps=steps, temperature=temperature, seed=17, den=FixedDenoiser(logits), batch_size=n, schedule=make_schedule("linear"))
    stat, dof = chi_square(res.tokens, probs)
    # mean dof, sd sqrt(2 dof); a 5-sd margin with a fixed seed is not flaky
    assert stat < dof + 5 * math.sqrt(2 * dof), (stat, dof)
    # and a wrong temperature is detected by the same statistic
    wrong = torch.softmax(logits.double() / (temperature * 1.5), -1)
    assert chi_square(res.tokens, wrong)[0] > dof + 10 * math.sqrt(2 * dof)


def test_ancestral_unmask_rate_follows_schedule():
    sched = make_schedule("loglinear")
    den = LinearDenoiser()
    steps, n = 5, 400
    run("ancestral", steps=steps, batch_size=n, schedule=sched, den=den, seed=2)
    grid = torch.linspace(1.0, 1e-5, steps + 1, dtype=torch.float64)
    for i, (x, _, t) in enumerate(den.calls[:steps]):
        assert float(t[0]) == pytest.approx(float(grid[i]), abs=1e-6)
        frac = (x == MASK).double().mean().item()
        # masked fraction at time t_i is 1 - alpha(t_i) / ... relative to all-mask start: (1-a(t_i))/(1-a(1))
        expect = float((1 - sched.alpha(grid[i])) / (1 - sched.alpha(grid[0])))
        assert frac == pytest.approx(expect, abs=0.02)


# ----------------------------------------------------------------------------- argument validation


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sampler="beam"), "beam.*ancestral, cache, confidence"),
        (dict(steps=0), "steps.*0"),
        (dict(steps=-3), "-3"),
        (dict(temperature=-0.5), "-0.5"),
        (dict(temperature=float("nan")), "nan"),
        (dict(loops=0), "loops.*0"),
        (dict(x_init=torch.full((B, L), MASK + 1), seq_len=None, batch_size=None), str(MASK + 1)),
        (dict(x_init=torch.full((B, L), -2), seq_len=None, batch_size=None), "-2"),
        (dict(x_init=torch.zeros(L, dtype=torch.long), seq_len=None, batch_size=None), r"\(16,\)"),
        (dict(x_init=torch.zeros(B, L), seq_len=None, batch_size=None), "float32"),
        (dict(x_init=torch.full((B, L), MASK), seq_len=5), "seq_len=5"),
        (dict(seq_len=None), "seq_len=None"),
        (dict(batch_size=0), "batch_size=0"),
        (dict(schedule=None), "schedule"),
    ],
)
def test_bad_arguments(kwargs, match):
    kw = dict(seq_len=L, batch_size=B)
    kw.update(kwargs)
    with pytest.raises(LoopMDMError, match=match) as info:
        run(kw.pop("sampler", "ancestral"), **kw)
    assert "\n" not in str(info.value)


def test_bad_denoiser_output_shape():
    with pytest.raises(LoopMDMError, match="expected"):
        sample(lambda x, n, t: torch.zeros(*x.shape, V + 1), mask_id=MASK, seq_len=L, batch_size=B, steps=2, loops=1, sampler="confidence")


# ----------------------------------------------------------------------------- decoding


def test_decode_samples():
    class Tok:
        def decode(self, ids, mask_id=None, mask_text="_"):
            return " ".join(mask_text if i == mask_id else str(i) for i in ids)

    toks = torch.tensor([[1, 2, MASK], [3, 4, 5]])
    assert decode_samples(Tok(), toks, MASK) == ["1 2 _", "3 4 5"]


# ----------------------------------------------------------------------------- noise removal


def test_final_noise_removal_uses_argmax():
    from loopmdm.diffusion.schedule import NoiseSchedule

    class HalfClean(NoiseSchedule):  # alpha(eps) ~ 0.5: about half the tokens are still masked at the end
        def alpha(self, t):
            return 0.5 * (1.0 - t)

        def alpha_prime(self, t):
            return torch.full_like(t, -0.5)

    den = LinearDenoiser()
    steps = 4
    res = run("ancestral", steps=steps, loops=LinearLoops(1, 4), schedule=HalfClean(), den=den, seed=0)
    assert res.nfe == steps + 1 and res.loops_per_call[-1] == 4
    x_last, _, t_last = den.calls[-1]
    assert float(t_last[0]) == pytest.approx(1e-5)
    still = x_last == MASK
    assert still.sum() > 5
    logits = LinearDenoiser()(x_last, 4, t_last)
    assert torch.equal(res.tokens[still], logits.argmax(-1)[still])
    assert not (res.tokens == MASK).any()
    cac = run("cache", steps=steps, loops=LinearLoops(1, 4), schedule=HalfClean(), seed=0)
    assert torch.equal(cac.tokens, res.tokens) and cac.nfe <= res.nfe
