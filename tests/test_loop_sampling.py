"""Loop-aware sampling: the runner reproduces forward(), halting and warm starts do what
they say, compute is accounted exactly, and the autoregressive judge is causal."""

import json
import math

import pytest
import torch

from loopmdm.cli import main
from loopmdm.config import ModelConfig
from loopmdm.errors import LoopMDMError
from loopmdm.evaluation.judge import ar_loss, generative_perplexity, unigram_entropy
from loopmdm.model.denoiser import LoopedDenoiser
from loopmdm.model.flops import forward_flops
from loopmdm.sampling.loop_runner import Halting, LoopRunner
from loopmdm.sampling.loop_schedule import ConstantLoops, LinearLoops, NoiseLoops, describe, parse_loop_schedule
from loopmdm.sampling.samplers import sample
from tests.conftest import tiny_overrides


def _model(seed=0, **kw) -> LoopedDenoiser:
    torch.manual_seed(seed)
    args = dict(vocab_size=20, n_layers=3, d_model=32, n_heads=2, cond_dim=16, loop_start=1, loop_end=2,
                max_train_loops=4)
    args.update(kw)
    model = LoopedDenoiser(ModelConfig(**args)).eval()
    with torch.no_grad():  # adaLN-Zero starts as the identity: give every weight a value
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def _inputs(B=3, L=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 21, (B, L), generator=g), torch.full((B,), 0.5)


@pytest.mark.parametrize("looped", [True, False])
def test_runner_without_halting_is_forward(looped):
    model = _model(**({} if looped else {"loop_start": None, "loop_end": None}))
    x, t = _inputs()
    runner = LoopRunner(model)
    for loops in (1, 3, 7):
        with torch.no_grad():
            assert torch.equal(runner(x, loops, t), model(x, num_loops=loops, t=t))
    assert [r.loops for r in runner.records] == ([1, 3, 7] if looped else [1, 1, 1])


@pytest.mark.parametrize("granularity", ["call", "sequence", "token"])
def test_halting_stops_at_min_loops_when_tau_is_huge(granularity):
    """Every relative change is below tau = 1e9: each row / token halts right at min_loops."""
    model = _model()
    x, t = _inputs()
    runner = LoopRunner(model, halting=Halting(1e9, 2, granularity))
    with torch.no_grad():
        assert torch.equal(runner(x, 9, t), model(x, num_loops=2, t=t))
    rec = runner.records[-1]
    assert rec.loops == 2 and rec.row_loops == [2.0, 2.0, 2.0]
    assert rec.flops == pytest.approx(3 * forward_flops(model.cfg, 10, 2))


@pytest.mark.parametrize("granularity", ["call", "sequence", "token"])
def test_halting_runs_to_the_cap_when_tau_is_tiny(granularity):
    model = _model()
    x, t = _inputs()
    runner = LoopRunner(model, halting=Halting(1e-12, 1, granularity))
    with torch.no_grad():
        assert torch.equal(runner(x, 6, t), model(x, num_loops=6, t=t))
    assert runner.records[-1].loops == 6


def test_token_halting_freezes_converged_positions():
    """Between the extremes, converged positions stop while others continue: fewer active
    FLOPs than computed ones, and a halted token's state no longer moves."""
    model = _model()
    x, t = _inputs(B=2, L=12)
    with torch.no_grad():
        c = model.condition(t, 2, x.device)
        h0 = model.run_prelude(x, c)
        states = list(model.iterate_loop(h0, c, None, 12))
        prev = [h0] + states[:-1]
        changes = torch.stack([(h - p).norm(dim=-1) / p.norm(dim=-1) for h, p in zip(states, prev)])  # (K, B, L)
    tau = float(changes[2].median())  # about half the positions converge by iteration 3
    runner = LoopRunner(model, halting=Halting(tau, 1, "token"))
    with torch.no_grad():
        runner(x, 12, t)
    rec = runner.records[-1]
    assert rec.active_flops < rec.flops
    assert min(rec.row_loops) < rec.loops
    # The frozen-state semantics, recomputed by hand with the same driver.
    active = torch.ones(2, 12, dtype=torch.bool)
    with torch.no_grad():
        def merge(k, hp, hn):
            nonlocal active
            ch = (hn - hp).norm(dim=-1) / hp.norm(dim=-1)
            hn = torch.where(active[..., None], hn, hp)
            active = active & (ch >= tau)
            return hn
        for h in model.iterate_loop(h0, c, None, 12, merge=merge):
            if not active.any():
                break
        ref = model.run_coda(h, c)
        runner2 = LoopRunner(model, halting=Halting(tau, 1, "token"))
        assert torch.allclose(runner2(x, 12, t), ref, atol=1e-6)


def test_warm_start_continues_the_loop_across_calls():
    """Pure recurrence: a second call on unchanged tokens that starts from the first call's
    H^3 and runs 3 more iterations reads H^6 -- forward() at S = 6."""
    model = _model()
    x, t = _inputs()
    runner = LoopRunner(model, warm_start=True)
    with torch.no_grad():
        first = runner(x, 3, t)
        second = runner(x, 3, t)
        assert torch.equal(first, model(x, num_loops=3, t=t))
        assert torch.allclose(second, model(x, num_loops=6, t=t), atol=1e-5)
        changed = x.clone()
        changed[:, 0] = (changed[:, 0] + 1) % 20  # a changed token restarts from the prelude
        runner.reset()
        runner(x, 3, t)
        mixed = runner(changed, 3, t)
        assert not torch.allclose(mixed, model(changed, num_loops=6, t=t), atol=1e-5)


def test_stats_account_every_call():
    model = _model()
    runner = LoopRunner(model)
    out = sample(runner, mask_id=model.mask_id, seq_len=10, batch_size=2, steps=4, loops=LinearLoops(1, 4),
                 sampler="confidence", generator=torch.Generator().manual_seed(0))
    stats = runner.stats(generated_tokens=20)
    assert stats["calls"] == out.nfe == 4 and stats["loops_hist"] == {1: 1, 2: 1, 3: 1, 4: 1}
    assert stats["loops_mean"] == 2.5 and stats["loop_passes"] == 10
    want = sum(2 * forward_flops(model.cfg, 10, s) for s in (1, 2, 3, 4)) / 20
    assert stats["flops_per_token"] == pytest.approx(want) and stats["active_flops_per_token"] == pytest.approx(want)


def test_sampler_on_step_sees_every_step():
    model = _model()
    seen = []
    sample(LoopRunner(model), mask_id=model.mask_id, seq_len=8, batch_size=1, steps=4, loops=2, sampler="confidence",
           generator=torch.Generator().manual_seed(0), on_step=lambda i, x: seen.append((i, int((x == 20).sum()))))
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4] and [m for _, m in seen] == [6, 4, 2, 0, 0]


def test_loop_schedule_spellings():
    assert parse_loop_schedule("8") == ConstantLoops(8)
    assert parse_loop_schedule("linear:12:2") == LinearLoops(12, 2)
    noise = parse_loop_schedule("noise:2:12")
    assert [noise.num_loops(0, 10, t) for t in (1.0, 0.75, 0.5, 0.0)] == [2, 10, 12, 2]
    for text in ("8", "linear:12:2", "noise:2:12"):
        assert describe(parse_loop_schedule(text)) == text
    for bad in ("0", "noise:0:3", "cosine:1:2", "noise:a:2", ""):
        with pytest.raises(LoopMDMError, match="loop|NoiseLoops|integer"):
            parse_loop_schedule(bad)
    with pytest.raises(LoopMDMError, match="granularity"):
        Halting(0.1, 1, "layer")
    with pytest.raises(LoopMDMError, match="tau"):
        Halting(0.0)
    assert NoiseLoops(3, 3).num_loops(0, 1, 0.3) == 3


def test_causal_model_sees_no_future():
    model = _model(loop_start=None, loop_end=None, causal=True)
    x, _ = _inputs(B=2, L=10)
    x = x.clamp(max=19)
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 3) % 20
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-6) and not torch.allclose(a[:, 6:], b[:, 6:])
    with pytest.raises(LoopMDMError, match="causal"):
        LoopedDenoiser(ModelConfig(vocab_size=20, n_layers=3, d_model=32, n_heads=2, cond_dim=16, causal=True))


def test_ar_loss_is_next_token_nll_and_judge_scores_samples():
    model = _model(loop_start=None, loop_end=None, causal=True)
    x = torch.randint(0, 20, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = ar_loss(model, x)
        logp = torch.log_softmax(model(x), -1)
    want = -logp[:, :-1].gather(-1, x[:, 1:, None]).mean()
    assert out.num_tokens == 16 and float(out.loss) == pytest.approx(float(want), rel=1e-5)
    ppl = generative_perplexity(model, x)
    assert ppl["tokens"] == 16 and ppl["gen_ppl"] == pytest.approx(math.exp(float(want)), rel=1e-5)
    with pytest.raises(LoopMDMError, match="causal"):
        generative_perplexity(_model(), x)
    assert unigram_entropy(torch.zeros(1, 8, dtype=torch.long)) == 0.0
    assert unigram_entropy(torch.arange(8)[None]) == pytest.approx(math.log(8))


@pytest.fixture(scope="module")
def judged_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    base = tiny_overrides(root)
    assert main(["train", "tiny", *base, "train.max_steps=4"]) == 0
    judge = [o for o in base if not o.startswith("train.out_dir")] + [
        f"train.out_dir={root / 'judge'}", "model.causal=true", "model.loop_start=null", "model.loop_end=null",
        "train.max_steps=4"]
    assert main(["train", "tiny", *judge]) == 0
    return root


def test_sample_cli_halting_show_and_accounting(judged_runs, capsys):
    code = main(["sample", str(judged_runs / "run"), "--loops", "6", "--halt-tau", "1e9", "--halt-min", "2",
                 "--steps", "4", "--num", "2", "--length", "16", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["loops_hist"] == {"2": out["calls"]} and out["loops_mean"] == 2.0
    assert out["flops_per_token"] > 0 and out["samples_per_s"] > 0
    code = main(["sample", str(judged_runs / "run"), "--loops", "noise:1:3", "--steps", "4", "--num", "1",
                 "--length", "12", "--show", "--sampler", "confidence"])
    text = capsys.readouterr().out
    assert code == 0 and "step 1/4" in text and "final" in text and "[" in text and "compute:" in text
    assert main(["sample", str(judged_runs / "run"), "--halt", "token"]) == 2
    assert "--halt-tau" in capsys.readouterr().err
    code = main(["sample", str(judged_runs / "run"), "--loops", "5", "--halt-rule", "kl", "--halt-tau", "1e-3",
                 "--steps", "3", "--num", "2", "--length", "16", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and len(out["call_loops"]) == len(out["call_step"]) == len(out["call_masked"]) == out["calls"]
    assert out["call_step"][0] == 0 and out["call_masked"][0] == 1.0
    assert main(["sample", str(judged_runs / "run"), "--halt-rule", "kl"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", str(judged_runs / "run"), "--halt-rule", "nope", "--halt-tau", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--halt-tau" in err and "invalid choice: 'nope'" in err


def test_sample_bench_writes_table_and_plot(judged_runs, capsys, tmp_path):
    code = main(["sample-bench", str(judged_runs / "run"), "--judge", str(judged_runs / "judge"), "--steps", "4",
                 "--loops", "1,2", "--taus", "0.5", "--num", "2", "--infill", "3", "--out", str(tmp_path / "bench"), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    labels = [r["label"] for r in result["records"]]
    assert labels[:2] == ["S=1", "S=2"] and any("halt-token" in x for x in labels) and any("+warm" in x for x in labels)
    for r in result["records"]:
        assert r["gen_ppl"] > 1 and r["entropy"] > 0 and r["calls"] >= 1
        assert 0.0 <= r["infill_acc"] <= 1.0 and r["infill_ppl"] > 1
    assert result["reference"]["gen_ppl"] > 1
    for name in ("sample_bench.json", "sample_bench.md", "sample_bench.png"):
        assert (tmp_path / "bench" / name).stat().st_size > 0
    # Resumable: a second bench with the same settings reuses every measured configuration, and
    # one with another step count adds its records to the file.
    before = (tmp_path / "bench" / "sample_bench.json").read_text()
    assert main(["sample-bench", str(judged_runs / "run"), "--judge", str(judged_runs / "judge"), "--steps", "4",
                 "--loops", "1,2", "--taus", "0.5", "--num", "2", "--infill", "3", "--out", str(tmp_path / "bench")]) == 0
    assert "resuming: 8 configurations" in capsys.readouterr().err
    assert json.loads((tmp_path / "bench" / "sample_bench.json").read_text())["records"] == json.loads(before)["records"]
    assert main(["sample-bench", str(judged_runs / "run"), "--judge", str(judged_runs / "judge"), "--steps", "2",
                 "--loops", "1", "--taus", "0.5", "--num", "2", "--infill", "3", "--out", str(tmp_path / "bench"), "--json"]) == 0
    merged = json.loads(capsys.readouterr().out)["records"]
    assert [r["steps"] for r in merged] == [2] * 7 + [4] * 8
    code = main(["sample-bench", str(judged_runs / "run"), "--judge", str(judged_runs / "run")])
    assert code == 2 and "not an autoregressive run" in capsys.readouterr().err
    # Infill only, fixed S and per-call halting by a rule: one record per configuration.
    code = main(["sample-bench", str(judged_runs / "run"), "--steps", "3", "--loops", "1,3", "--taus", "0.5",
                 "--rules", "change-masked:0.2", "--lean", "--num", "0", "--infill", "2",
                 "--out", str(tmp_path / "infill"), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    records = json.loads(captured.out)["records"]
    assert code == 0 and [r["label"] for r in records] == [
        "S=1", "S=3", "halt-call tau=0.5 (S in [1, 3])", "halt-call change-masked tau=0.2 (S in [1, 3])"]
    assert all(0.0 <= r["infill_acc"] <= 1.0 and len(r["call_loops"]) == r["calls"] for r in records)
    for bad in (["--rules", "kl"], ["--num", "0"]):
        assert main(["sample-bench", str(judged_runs / "run"), *bad, "--out", str(tmp_path / "x")]) == 2
        assert capsys.readouterr().err.startswith("error:")
