"""Loop diagnostics (analysis/loop_diagnostics.py, `loopmdm analyze`, the training-time
`loop_diag` record): explicit attention = SDPA, NELBO at k = the validation bound at S = k,
attention masses, relative change, gates."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from loopmdm.analysis.loop_diagnostics import compact_record, loop_diagnostics
from loopmdm.analysis.plots import PLOT_FILES
from loopmdm.config import ModelConfig
from loopmdm.diffusion.objective import forward_mask, sample_times
from loopmdm.diffusion.schedule import make_schedule
from loopmdm.errors import LoopMDMError
from loopmdm.evaluation.nelbo import evaluate_nelbo
from loopmdm.model.denoiser import LoopedDenoiser
from loopmdm.model.layers import Rotary, SelfAttention
from tests.test_cli import run_cli, trained_run  # noqa: F401  (a module-scoped tiny trained run)

VOCAB, PAD = 40, 39


def tiny_model(seed=0, perturb=0.0, **overrides) -> LoopedDenoiser:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, n_layers=3, d_model=32, n_heads=2, cond_dim=16, loop_start=1, loop_end=2,
               max_train_loops=3)
    cfg.update(overrides)
    model = LoopedDenoiser(ModelConfig(**cfg))
    if perturb:  # a fresh DiT is the identity (zero-init adaLN and head): give every weight a value
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, perturb)
    return model.eval()


def tiny_blocks(n=20, length=16, pads=True) -> np.ndarray:
    blocks = np.random.default_rng(0).integers(0, PAD, size=(n, length))
    if pads:  # pad-packed rows: trailing pads in every third sequence
        blocks[::3, length - 5:] = PAD
    return blocks


def diagnostics(model, blocks, **kw):
    args = dict(eps=1e-3, max_loops=4, batch_size=8, num_batches=0, seed=7, prompt_len=0, device="cpu", pad_id=PAD)
    args.update(kw)
    return loop_diagnostics(model, blocks, make_schedule("loglinear"), **args)


@pytest.mark.parametrize("with_mask", [False, True])
def test_explicit_attention_equals_sdpa(with_mask):
    torch.manual_seed(0)
    attn = SelfAttention(32, 4).eval()
    rotary = Rotary(8)
    x = torch.randn(3, 10, 32)
    key_mask = None
    if with_mask:
        key_mask = torch.ones(3, 10, dtype=torch.bool)
        key_mask[0, 7:] = False
        key_mask[2, :3] = False
    reference = attn(x, rotary, key_mask)
    seen = []
    attn.probe = seen.append
    explicit = attn(x, rotary, key_mask)
    attn.probe = None
    assert len(seen) == 1 and seen[0].shape == (3, 4, 10, 10)
    torch.testing.assert_close(explicit, reference, atol=1e-5, rtol=1e-5)
    probs = seen[0].detach()
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 4, 10))
    if with_mask:
        assert probs[0, :, :, 7:].abs().max() == 0 and probs[2, :, :, :3].abs().max() == 0
    assert float(probs[1].std()) > 1e-3  # not uniform: the check compares real attention patterns


@pytest.mark.parametrize("prompt_len", [0, 4])
def test_nelbo_at_k_is_the_validation_bound_at_s_equals_k(prompt_len):
    model, blocks = tiny_model(perturb=0.3), tiny_blocks()
    diag = diagnostics(model, blocks, prompt_len=prompt_len)
    direct = evaluate_nelbo(model, blocks, make_schedule("loglinear"), [1, 2, 3, 4], eps=1e-3, batch_size=8,
                            num_batches=0, seed=7, pad_id=PAD, prompt_len=prompt_len)
    ours = [r["nelbo"] for r in diag["per_loop"]]
    assert ours == pytest.approx([r["nll"] for r in direct], rel=1e-5)
    assert len(set(round(v, 4) for v in ours)) == 4  # the loop matters here: the check is not vacuous
    assert diag["tokens"] == direct[0]["tokens"] and diag["sequences"] == 20
    for r in diag["per_loop"]:  # the t bins partition the tokens
        by_t = sum(v * n for v, n in zip(r["nelbo_by_t"], diag["tokens_by_t"]) if n)
        assert by_t / diag["tokens"] == pytest.approx(r["nelbo"], rel=1e-9)
    assert diagnostics(model, blocks, prompt_len=prompt_len) == diag  # seeded: deterministic


def test_attention_masses_of_masked_queries_sum_to_one():
    model, blocks = tiny_model(perturb=0.3), tiny_blocks()
    diag = diagnostics(model, blocks)
    for r in diag["per_loop"]:
        for mm, mu in zip(r["mask_to_mask"], r["mask_to_unmasked"]):
            assert 0 < mm < 1 and mm + mu == pytest.approx(1.0, abs=1e-6)
    json.dumps(diag, allow_nan=False)  # finite JSON throughout


def test_uniform_attention_puts_the_masked_key_fraction_on_masked_keys():
    model, blocks = tiny_model(perturb=0.3), tiny_blocks()
    with torch.no_grad():
        model.loop_block[0].attn.qkv.weight[:64] = 0.0  # q = k = 0: every query attends uniformly
    diag = diagnostics(model, blocks)
    for r in diag["per_loop"]:
        assert r["mask_to_mask"][0] == pytest.approx(diag["masked_key_frac"], rel=1e-5)
        for value, frac in zip(r["mask_to_mask_by_t"][0], diag["masked_key_frac_by_t"]):
            assert (value is None and frac is None) or value == pytest.approx(frac, rel=1e-5)


def test_relative_change_is_zero_for_an_identity_loop_and_positive_after_a_perturbation():
    model, blocks = tiny_model(), tiny_blocks()  # fresh DiT: zero-init adaLN, the loop block is the identity
    diag = diagnostics(model, blocks)
    for r in diag["per_loop"]:
        assert r["rel_change_masked"] == 0.0 and r["rel_change_unmasked"] == 0.0
    assert len({r["nelbo"] for r in diag["per_loop"]}) == 1
    assert diag["gates"]["attn"] == [0.0] and diag["gates"]["mlp"] == [0.0]
    with torch.no_grad():
        for p in model.loop_block.parameters():
            p.add_(0.2 * torch.randn_like(p))
    diag = diagnostics(model, blocks)
    for r in diag["per_loop"]:
        assert r["rel_change_masked"] > 0 and r["rel_change_unmasked"] > 0
    assert diag["gates"]["attn"][0] > 0 and diag["gates"]["mlp"][0] > 0
    assert all(block.attn.probe is None for block in model.loop_block)  # the hooks are removed


def test_relative_change_matches_the_hidden_states_of_forward():
    model, blocks = tiny_model(perturb=0.3, input_injection=True), tiny_blocks()
    diag = diagnostics(model, blocks, batch_size=20)  # one batch
    schedule, x0 = make_schedule("loglinear"), torch.from_numpy(blocks)
    valid = x0 != PAD
    generator = torch.Generator().manual_seed(7)
    t = sample_times(20, 1e-3, True, generator)
    x_t, masked = forward_mask(x0, t, schedule, model.mask_id, generator, valid)
    with torch.no_grad():
        _, hidden = model(x_t, num_loops=4, t=t, key_mask=valid, return_hidden=True)
    for k, r in enumerate(diag["per_loop"], start=1):
        ratio = (hidden[k] - hidden[k - 1]).norm(dim=-1) / hidden[k - 1].norm(dim=-1)
        assert r["rel_change_masked"] == pytest.approx(float(ratio[masked].mean()), rel=1e-5)
        assert r["rel_change_unmasked"] == pytest.approx(float(ratio[valid & ~masked].mean()), rel=1e-5)


def test_gates_are_the_mean_absolute_adaln_gates():
    model, blocks = tiny_model(), tiny_blocks()
    with torch.no_grad():  # c does not matter with zero weights: the gates are the biases
        bias = model.loop_block[0].adaLN_modulation.bias.view(6, 32)
        bias[2] = -0.25  # gate_attn
        bias[5] = torch.linspace(-1, 1, 32)  # gate_mlp
    expected_mlp = float(torch.linspace(-1, 1, 32).abs().mean())
    diag = diagnostics(model, blocks, max_loops=1)
    assert diag["gates"]["attn"][0] == pytest.approx(0.25) and diag["gates"]["mlp"][0] == pytest.approx(expected_mlp)


def test_a_model_without_a_loop_is_refused():
    with pytest.raises(LoopMDMError, match="looped model"):
        diagnostics(tiny_model(loop_start=None, loop_end=None), tiny_blocks())


def test_compact_record_and_empty_bins_are_finite_json():
    model, blocks = tiny_model(perturb=0.3), tiny_blocks(n=2, pads=False)
    diag = diagnostics(model, blocks, max_loops=2, batch_size=2)  # 2 sequences: most t bins are empty
    assert None in diag["per_loop"][0]["nelbo_by_t"]
    record = compact_record(diag)
    text = json.dumps(record, allow_nan=False)
    assert len(record["nelbo"]) == 2 and len(record["mask_to_mask"][0]) == 1 and "NaN" not in text


def test_cli_analyze_json_table_and_plots(trained_run, capsys, tmp_path):  # noqa: F811
    run = str(trained_run / "run")
    code, out, _ = run_cli(capsys, "analyze", run, "--json", "--loops", "4", "--batches", "1",
                           "--plots", str(tmp_path / "plots"))
    assert code == 0
    diag = json.loads(out)
    assert {"per_loop", "gates", "t_bins", "loop_layers", "masked_key_frac", "step", "max_train_loops"} <= set(diag)
    assert [r["k"] for r in diag["per_loop"]] == [1, 2, 3, 4] and diag["loop_layers"] == [1]
    assert set(diag["per_loop"][0]) == {"k", "nelbo", "nelbo_by_t", "rel_change_masked", "rel_change_unmasked",
                                        "hidden_norm", "mask_to_mask", "mask_to_unmasked", "mask_to_mask_by_t"}
    assert all(math.isfinite(r["nelbo"]) and r["rel_change_masked"] > 0 for r in diag["per_loop"])
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(PLOT_FILES)
    assert all(Path(p).stat().st_size > 1000 for p in diag["plots"])
    code, out, _ = run_cli(capsys, "analyze", run, "--loops", "2", "--batches", "1")
    assert code == 0 and "NELBO" in out and "adaLN gates" in out and len(out.splitlines()) >= 5
    code, _, err = run_cli(capsys, "analyze", run, "--loops", "0")
    assert code == 2 and "--loops 0" in err


def test_training_logs_a_finite_loop_diag_record_at_each_validation(trained_run):  # noqa: F811
    records = [json.loads(line) for line in (trained_run / "run" / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in records if r["kind"] == "val"]
    diags = [r for r in records if r["kind"] == "loop_diag"]
    assert vals and [r["step"] for r in diags] == [r["step"] for r in vals]
    for r in diags:
        assert r["loops"] == 3 and len(r["nelbo"]) == 3 and len(r["rel_change"]) == 3
        assert len(r["mask_to_mask"]) == 3 and all(len(row) == 1 for row in r["mask_to_mask"])
        assert all(math.isfinite(v) for v in r["nelbo"] + r["rel_change"]) and r["tokens"] > 0


def test_loop_diagnostics_switch_off_writes_no_record(tiny_cfg_factory):
    from loopmdm.training.run import train

    cfg = tiny_cfg_factory("train.max_steps=2", "train.loop_diagnostics=false")
    train(cfg, progress_print=lambda *_: None)
    kinds = [json.loads(line)["kind"] for line in (Path(cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert "val" in kinds and "loop_diag" not in kinds
