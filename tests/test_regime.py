"""The data-scarce regime: character tokenizer, whole-document test split, the training-data
cap with epochs, best-on-validation weights, and mask->mask attention for any model."""

import json
import math

import numpy as np
import pytest
import torch

from loopmdm.analysis.attention import mask_attention_by_layer
from loopmdm.config import DataConfig, load_config
from loopmdm.data.corpus import Document, split_names, val_flags
from loopmdm.data.prepare import cache_key, prepare_data
from loopmdm.data.tokenizer import build_tokenizer
from loopmdm.errors import LoopMDMError
from loopmdm.model.denoiser import LoopedDenoiser
from loopmdm.runs import load_run
from loopmdm import checkpoint as ckpt
from loopmdm.training.run import train
from loopmdm.training.trainer import Trainer


def test_char_tokenizer_round_trips_and_maps_unseen_characters_to_unk():
    cfg = DataConfig(tokenizer="char")
    tok = build_tokenizer(cfg, ["To be, or not to be:\nthat is", "the question."])
    text = "To be, or not\nto be: that is the question."
    ids = tok.encode(text)
    assert len(ids) == len(text)  # one id per character, newlines and spaces included
    assert tok.decode(ids) == text
    assert tok.vocab_size == len(set("To be, or not to be:\nthat isthe question.")) + 3  # + EOS, pad, unk
    unk = tok.tok.token_to_id("<|unk|>")
    assert tok.encode("Zz") == [unk, unk]  # neither 'Z' nor 'z' occurs in the train text
    assert tok.decode(tok.encode("to be") + [tok.eos_id]) == "to be<|endoftext|>"


def test_test_split_holds_out_whole_documents_and_leaves_validation_unchanged():
    ids = [f"doc{i}" for i in range(200)]
    names = split_names(ids, 0.1, 0.1, seed=0)
    assert set(names) == {"train", "val", "test"}
    assert 8 <= names.count("test") <= 35 and 8 <= names.count("val") <= 35
    # adding a test split never moves a validation document (runs keep their validation curves)
    assert [n == "val" for n in names] == val_flags(ids, 0.1, seed=0)
    assert split_names(ids, 0.1, 0.0, seed=0).count("test") == 0
    # a tiny corpus still gets one document of each kind
    assert sorted(split_names(ids[:3], 0.1, 0.1, seed=0)) == ["test", "train", "val"]
    with pytest.raises(LoopMDMError, match="at least 3"):
        split_names(ids[:2], 0.1, 0.1, seed=0)


def test_cache_key_unchanged_without_a_test_split_and_without_the_cap():
    base = DataConfig(source="shakespeare", tokenizer="char")
    assert cache_key(base) == cache_key(DataConfig(source="shakespeare", tokenizer="char", train_tokens=4096))
    assert cache_key(base) != cache_key(DataConfig(source="shakespeare", tokenizer="char", test_fraction=0.1))


def test_prepared_test_split_is_disjoint_and_absent_one_is_a_clear_error(tiny_cfg_factory):
    cfg = tiny_cfg_factory("data.tokenizer=char", "data.test_fraction=0.2")
    data = prepare_data(cfg.data)
    sizes = {s: len(data.blocks(s)) for s in ("train", "val", "test")}
    assert all(n > 0 for n in sizes.values())
    import glob

    from tests.conftest import bbc_glob

    assert data.meta["n_train_docs"] + data.meta["n_val_docs"] + data.meta["n_test_docs"] == len(glob.glob(bbc_glob()))
    # whole documents: no document is in two splits (packed rows may repeat across documents)
    from loopmdm.data.corpus import SplitCorpus

    corpus = SplitCorpus(cfg.data)
    ids = {split: {d.doc_id for d in corpus.iter(split)} for split in sizes}
    assert not ids["test"] & ids["train"] and not ids["test"] & ids["val"] and not ids["val"] & ids["train"]
    assert {len(ids[split]) for split in ("val", "test")} and all(ids.values())
    assert data.meta["n_test_docs"] == len(ids["test"]) and data.meta["n_val_docs"] == len(ids["val"])
    plain = prepare_data(tiny_cfg_factory("data.tokenizer=char").data)
    assert plain.meta["n_val_docs"] == data.meta["n_val_docs"]  # same validation documents
    with pytest.raises(LoopMDMError, match="no test split; prepare it with data.test_fraction"):
        plain.blocks("test")


def test_config_rejects_bad_regime_settings(tiny_cfg_factory):
    with pytest.raises(LoopMDMError, match="data.test_fraction=0.9"):
        tiny_cfg_factory("data.test_fraction=0.9")
    with pytest.raises(LoopMDMError, match="data.train_tokens=-1"):
        tiny_cfg_factory("data.train_tokens=-1")
    with pytest.raises(LoopMDMError, match="data.source=pairs is scored on its own test pairs"):
        load_config(None, ["data.source=pairs", "data.paths=[x.jsonl]", "data.test_fraction=0.1"])


def test_task_test_split_is_disjoint_seeded_apart_and_leaves_validation_unchanged(tmp_path):
    from loopmdm.evaluation.solve import task_test_set

    def prepared(*extra):
        cfg = load_config(None, ["data.source=task", "data.task=sudoku", "data.task_size=4", "data.task_examples=200",
                                 "data.val_fraction=0.2", f"data.cache_dir={tmp_path}", *extra]).data
        return prepare_data(cfg)

    plain, held = prepared(), prepared("data.test_fraction=0.3")
    assert not plain.has_split("test") and held.has_split("test")
    assert np.array_equal(plain.blocks("val"), held.blocks("val")) and np.array_equal(plain.blocks("train"), held.blocks("train"))
    rows = {split: {r.tobytes() for r in np.asarray(held.blocks(split))} for split in ("train", "val", "test")}
    assert rows["test"] and not rows["test"] & rows["train"] and not rows["test"] & rows["val"]
    assert 0 < len(held.blocks("test")) <= 60
    on_test = task_test_set(held, 8, split="test")
    assert {r.tobytes() for r in on_test["target"].astype(held.blocks("test").dtype)} <= rows["test"]
    on_val = task_test_set(held, 8)
    assert {r.tobytes() for r in on_val["target"].astype(held.blocks("val").dtype)} <= rows["val"]


def test_task_test_split_table_pairs_hops_within_seed_by_hand():
    from tests.conftest import benchmark_module

    split = benchmark_module("task_test_split")
    rec = lambda s, hops: {"loops": s, "per_hop": hops}  # noqa: E731
    out = {"order": "oneshot", "num": 10, "runs": {
        "mdm-s0": [rec(1, [0.9, 0.2])], "mdm-s1": [rec(1, [0.7, 0.4])],
        "loop-s0": [rec(1, [0.5, 0.1]), rec(8, [0.6, 0.5])], "loop-s1": [rec(1, [0.3, 0.3]), rec(8, [0.5, 0.3])],
        "loop-s2": [rec(1, [0.0, 0.0]), rec(8, [1.0, 1.0])]}}  # seed 2 has no MDM: left out of every cell
    table = split.per_hop_markdown(out)
    assert "seeds [0, 1]" in table
    assert "| mdm, S = 1 | 0.800 ± 0.100 | 0.300 ± 0.100 |" in table
    assert "| loop, S = 8 | 0.550 ± 0.050 | 0.400 ± 0.100 |" in table
    # S = 8 - MDM per seed: hop 1 (-0.3, -0.2), hop 2 (+0.3, -0.1); S = 8 - S = 1: (+0.1, +0.2), (+0.4, 0.0)
    assert "| loop S = 8 − mdm | -0.250 ± 0.050 | +0.100 ± 0.200 |" in table
    assert "| loop S = 8 − S = 1 | +0.150 ± 0.050 | +0.200 ± 0.200 |" in table
    assert table.index("| mdm, S = 1") < table.index("| loop, S = 1")


def test_regime_report_pairs_task_scores_within_seed(tmp_path):
    from loopmdm.experiments.regime_report import regime_section
    from loopmdm.experiments.suites import SUITES

    curve = [{"step": 1, "flops": 1.0, "epoch": 1.0, "val_nll": 2.0}, {"step": 2, "flops": 2.0, "epoch": 2.0, "val_nll": 1.9}]
    solved = {("mdm", 0): {1: 0.40}, ("mdm", 1): {1: 0.50}, ("loop", 0): {1: 0.30, 8: 0.55}, ("loop", 1): {1: 0.35, 8: 0.70},
              ("deeper", 0): {1: 0.45}, ("deeper", 1): {1: 0.45}}

    def ev(arm, seed):
        per_s = solved[(arm, seed)]
        return {"arm": arm, "seed": seed, "step": 2, "train_time": 60.0, "epochs": 2.0, "val_curve": curve,
                "best": {"step": 2, "val_nll": 1.9, "epoch": 2.0},
                "test_nelbo": [{"loops": s, "nll": 1.0, "sequences": 8, "tokens": 64} for s in per_s],
                "orders": {o: [{"loops": s, "solved": v} for s, v in per_s.items()] for o in ("raster", "confidence", "oneshot")}}

    evaluations = {f"{a}-s{s}": ev(a, s) for a, s in solved}
    suite = SUITES["sudoku-scarce"]
    scale = suite.scales["cpu"]
    lines, out = regime_section(suite, scale, tmp_path, evaluations, ["mdm", "loop", "deeper"])
    raster = out["task"]["raster"]
    assert raster["per_seed"]["loop"]["8"] == [0.55, 0.70]
    d = raster["paired"]["loop S=8 - mdm"]
    assert d["per_seed"] == pytest.approx([0.15, 0.20]) and d["mean"] == pytest.approx(0.175)
    assert d["se"] == pytest.approx(np.std([0.15, 0.20], ddof=1) / np.sqrt(2))
    assert raster["paired"]["loop S=8 - loop S=1"]["mean"] == pytest.approx(0.30)
    assert raster["paired"]["deeper - mdm"]["per_seed"] == pytest.approx([0.05, -0.05])
    assert any("raster: boards solved" in line for line in lines)


def test_train_tokens_caps_the_data_and_counts_epochs(tiny_cfg_factory):
    cfg = tiny_cfg_factory("data.tokenizer=char", "data.train_tokens=500")  # 16 blocks of 32
    data = prepare_data(cfg.data)
    cfg.model.vocab_size = data.vocab_size
    trainer = Trainer(cfg, data, cfg.train.out_dir)
    cfg.model.vocab_size = 0
    assert len(trainer.loader.blocks) == 16 and trainer.epoch_tokens == 16 * 32
    np.testing.assert_array_equal(trainer.loader.blocks, data.blocks("train")[:16])
    summary = train(cfg)
    assert summary["epochs"] == pytest.approx(12 * 8 / 16)  # 12 steps of 8 rows over 16 rows
    records = [json.loads(line) for line in open(f"{cfg.train.out_dir}/metrics.jsonl")]
    assert [r for r in records if r["kind"] == "val"][-1]["epoch"] == pytest.approx(6.0)
    too_many = tiny_cfg_factory("data.tokenizer=char", "data.train_tokens=100000000", "train.out_dir=" + cfg.train.out_dir + "2")
    with pytest.raises(LoopMDMError, match="data.train_tokens=100000000 asks for"):
        train(too_many)


def test_best_weights_are_those_of_the_lowest_validation_nelbo(tiny_cfg_factory):
    # lr high enough that validation moves; evaluated every 2 steps
    cfg = tiny_cfg_factory("data.tokenizer=char", "train.eval_every=2", "train.lr=3e-3")
    summary = train(cfg)
    vals = [json.loads(line) for line in open(f"{cfg.train.out_dir}/metrics.jsonl")]
    vals = [r for r in vals if r["kind"] == "val"]
    best = min(vals, key=lambda r: r["val_nll"])
    info = ckpt.read_best_info(cfg.train.out_dir)
    assert info["step"] == best["step"] and info["val_nll"] == pytest.approx(best["val_nll"])
    assert summary["best_val_nll"] == pytest.approx(best["val_nll"]) and summary["best_step"] == best["step"]
    assert vals[-1]["best_val_nll"] == pytest.approx(best["val_nll"])
    # the stored weights reproduce the recorded validation NELBO
    from loopmdm.diffusion.schedule import make_schedule
    from loopmdm.evaluation.nelbo import evaluate_nelbo

    run = load_run(cfg.train.out_dir, device="cpu", best=True)
    assert run.step == best["step"]
    data = run.prepared_data()
    nll = evaluate_nelbo(run.model, data.blocks("val"), make_schedule("loglinear", cfg.diffusion.eps),
                         [cfg.model.max_train_loops], eps=cfg.diffusion.eps, batch_size=cfg.eval.batch_size,
                         num_batches=cfg.train.eval_batches, seed=cfg.eval.seed)[0]["nll"]
    assert nll == pytest.approx(best["val_nll"], rel=1e-5)


def test_resume_keeps_the_best_weights_of_its_own_timeline(tiny_cfg_factory, tmp_path):
    straight = train(tiny_cfg_factory("data.tokenizer=char", "train.eval_every=2", "train.lr=3e-3",
                                      f"train.out_dir={tmp_path / 'a'}"))
    first = tiny_cfg_factory("data.tokenizer=char", "train.eval_every=2", "train.lr=3e-3",
                             f"train.out_dir={tmp_path / 'b'}", "train.max_steps=6")
    train(first)
    second = tiny_cfg_factory("data.tokenizer=char", "train.eval_every=2", "train.lr=3e-3", f"train.out_dir={tmp_path / 'b'}")
    resumed = train(second, resume=True)
    assert resumed["best_step"] == straight["best_step"]
    assert resumed["best_val_nll"] == pytest.approx(straight["best_val_nll"], rel=1e-6)


def test_load_best_without_best_weights_is_one_clear_line(tmp_path):
    with pytest.raises(LoopMDMError, match="no best-on-validation weights"):
        ckpt.load_best(tmp_path)


def _uniform_attention_model(cfg):
    """The config's data and a model whose query/key projections are zero: every query attends
    uniformly, so the share of attention on masked keys is the fraction of masked positions."""
    data = prepare_data(cfg.data)
    cfg.model.vocab_size = data.vocab_size
    torch.manual_seed(0)
    model = LoopedDenoiser(cfg.model)
    d = cfg.model.d_model
    with torch.no_grad():
        for block in [*model.prelude, *model.loop_block, *model.coda]:
            block.attn.qkv.weight[: 2 * d].zero_()
            if block.attn.qkv.bias is not None:
                block.attn.qkv.bias[: 2 * d].zero_()
    return data, model


@pytest.mark.parametrize("looped", [True, False])
def test_mask_attention_equals_the_masked_key_fraction_under_uniform_attention(tiny_cfg_factory, looped):
    """Oracle: with zero query/key projections every query attends uniformly, so the share of
    attention on masked keys is exactly the fraction of masked positions."""
    extra = [] if looped else ["model.loop_start=null", "model.loop_end=null"]
    cfg = tiny_cfg_factory("data.tokenizer=char", *extra)
    data, model = _uniform_attention_model(cfg)
    out = mask_attention_by_layer(model, data.blocks("val"), cfg, "cpu", batch_size=4, num_batches=2)
    n_calls = cfg.model.n_layers + (cfg.model.max_train_loops - 1) * (1 if looped else 0)
    assert len(out["layers"]) == len(out["mask_to_mask"]) == n_calls
    if looped:
        assert out["layers"][1:4] == ["loop.0@k1", "loop.0@k2", "loop.0@k3"]
    np.testing.assert_allclose(out["mask_to_mask"], out["masked_key_frac"], rtol=1e-5)


def test_mask_attention_on_a_task_masks_only_the_answers_as_training_does(tiny_cfg_factory):
    """k-hop's edge list is given, never masked: under uniform attention the share on masked keys
    is the fraction of masked *answer* positions, at most answers / sequence length. Masking the
    prompt too (the old probe) gives about half the sequence."""
    cfg = tiny_cfg_factory("data.source=task", "data.task=khop", "data.task_size=8", "data.task_hops=4",
                           "data.task_examples=400", "model.loop_start=null", "model.loop_end=null")
    data, model = _uniform_attention_model(cfg)
    length = data.blocks("val").shape[1]
    assert 0 < data.prompt_len < length
    out = mask_attention_by_layer(model, data.blocks("val"), cfg, "cpu", batch_size=8, num_batches=2,
                                  prompt_len=data.prompt_len, prompt_sep_id=data.prompt_sep_id)
    answers = (length - data.prompt_len) / length
    assert 0 < out["masked_key_frac"] <= answers
    np.testing.assert_allclose(out["mask_to_mask"], out["masked_key_frac"], rtol=1e-5)
    everything = mask_attention_by_layer(model, data.blocks("val"), cfg, "cpu", batch_size=8, num_batches=2)
    assert everything["masked_key_frac"] > answers


# --- the regime report: values, not keys -----------------------------------------------------

def test_regime_report_reads_matches_and_pairs_by_hand():
    from loopmdm.experiments.regime_report import first_reach, flops_ratio, mean_se, regime_of

    mdm = [{"step": 1, "flops": 10.0, "epoch": 1.0, "val_nll": 3.0}, {"step": 2, "flops": 20.0, "epoch": 2.0, "val_nll": 2.0},
           {"step": 3, "flops": 30.0, "epoch": 3.0, "val_nll": 2.2}]
    loop = [{"step": 1, "flops": 10.0, "epoch": 0.5, "val_nll": 2.5}, {"step": 2, "flops": 20.0, "epoch": 1.0, "val_nll": 1.5}]
    assert first_reach(loop, 2.0) == pytest.approx(15.0)  # halfway between 2.5 and 1.5
    assert first_reach(loop, 2.0, key="epoch") == pytest.approx(0.75)
    assert flops_ratio(mdm, loop) == pytest.approx(20.0 / 15.0)  # MDM's best (2.0 at 20) vs loop reaching 2.0 at 15
    assert flops_ratio(loop, mdm) is None  # MDM never reaches 1.5
    assert regime_of(loop).startswith("still improving") and "+0.2000" in regime_of(mdm)
    m, se = mean_se([1.0, 2.0, 3.0])
    assert m == pytest.approx(2.0) and se == pytest.approx(1.0 / np.sqrt(3))
    assert mean_se([4.0]) == (4.0, None)


def test_regime_report_uses_the_same_seeds_in_every_cell(tmp_path):
    from loopmdm.experiments.regime_report import regime_section
    from loopmdm.experiments.suites import SUITES

    curve = [{"step": 1, "flops": 1.0, "epoch": 1.0, "val_nll": 2.0}, {"step": 2, "flops": 2.0, "epoch": 2.0, "val_nll": 1.9}]

    def ev(arm, seed, nll):
        loops = [1, 2] if arm == "loop" else [1]
        return {"arm": arm, "seed": seed, "step": 2, "train_time": 60.0, "epochs": 2.0, "val_curve": curve,
                "best": {"step": 2, "val_nll": 1.9, "epoch": 2.0},
                "test_nelbo": [{"loops": s, "nll": nll - 0.01 * (s - 1), "sequences": 8, "tokens": 64} for s in loops]}

    evaluations = {"mdm-s0": ev("mdm", 0, 2.0), "mdm-s1": ev("mdm", 1, 2.2), "mdm-s2": ev("mdm", 2, 9.9),
                   "loop-s0": ev("loop", 0, 1.9), "loop-s1": ev("loop", 1, 2.0)}  # loop has no seed 2
    suite = SUITES["shakespeare-char"]
    lines, out = regime_section(suite, None, tmp_path, evaluations, ["mdm", "loop"])
    assert out["seeds"] == [0, 1]
    assert out["test_nelbo"]["mdm"]["1"]["per_seed"] == [2.0, 2.2]  # seed 2's 9.9 never enters a mean
    diff = out["paired"]["loop S=1 - mdm"]
    assert diff["per_seed"] == pytest.approx([-0.1, -0.2]) and diff["mean"] == pytest.approx(-0.15)
    assert diff["se"] == pytest.approx(np.std([-0.1, -0.2], ddof=1) / np.sqrt(2))
    assert out["paired"]["loop S=2 - loop S=1"]["mean"] == pytest.approx(-0.01)
    assert (tmp_path / "test_nelbo.png").stat().st_size > 0


def test_a_knob_arm_is_paired_with_loopmdm_at_the_same_s_and_with_the_mdm(tmp_path):
    """A knob arm (loop-trunc) is a LoopMDM too: it is compared with LoopMDM at the same S (the
    report once compared LoopMDM at each S with the knob at S = 1, where the knob's loop is off),
    with the MDM at each S, and with its own S = 1."""
    from loopmdm.experiments.regime_report import regime_section
    from loopmdm.experiments.suites import SUITES

    curve = [{"step": 1, "flops": 1.0, "epoch": 1.0, "val_nll": 2.0}]
    test = {"mdm": {1: 2.30}, "loop": {1: 2.50, 4: 2.45}, "loop-trunc": {1: 2.60, 4: 2.40}}

    def ev(arm, seed):  # seed 1: every value 0.1 higher (a knob arm at the headline seeds: --knob-seeds)
        return {"arm": arm, "seed": seed, "step": 1, "train_time": 60.0, "epochs": 1.0, "val_curve": curve,
                "best": {"step": 1, "val_nll": 2.0, "epoch": 1.0},
                "test_nelbo": [{"loops": k, "nll": v + 0.1 * seed, "sequences": 8, "tokens": 64}
                               for k, v in test[arm].items()]}

    evaluations = {f"{arm}-s{seed}": ev(arm, seed) for arm in test for seed in (0, 1)}
    suite = SUITES["shakespeare-char"]
    lines, out = regime_section(suite, None, tmp_path, evaluations, ["mdm", "loop", "loop-trunc"])
    paired = {key: d["mean"] for key, d in out["paired"].items()}
    assert paired["loop-trunc S=4 - loop S=4"] == pytest.approx(-0.05)
    assert out["paired"]["loop-trunc S=4 - loop S=4"]["per_seed"] == pytest.approx([-0.05, -0.05])  # both seeds
    assert paired["loop-trunc S=4 - mdm"] == pytest.approx(0.10)
    assert paired["loop-trunc S=4 - loop-trunc S=1"] == pytest.approx(-0.20)
    assert paired["loop S=4 - mdm"] == pytest.approx(0.15)
    assert not [key for key in paired if key.startswith("loop S=") and "loop-trunc" in key]  # one direction only


def test_eval_cli_scores_the_test_split_with_the_best_weights_and_draws_the_loop_plot(tiny_cfg_factory, tmp_path, capsys):
    from loopmdm.cli import main

    cfg = tiny_cfg_factory("data.tokenizer=char", "data.test_fraction=0.2", "train.eval_every=4")
    train(cfg)
    capsys.readouterr()
    png = tmp_path / "loops.png"
    main(["eval", cfg.train.out_dir, "--split", "test", "--best", "--loops", "1,2,4", "--plot", str(png), "--json"])
    records = json.loads(capsys.readouterr().out.splitlines()[-1])
    info = ckpt.read_best_info(cfg.train.out_dir)
    assert [r["loops"] for r in records] == [1, 2, 4]
    assert all(r["split"] == "test" and r["step"] == info["step"] for r in records)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mdm = tiny_cfg_factory("data.tokenizer=char", "data.test_fraction=0.2", "model.loop_start=null", "model.loop_end=null",
                           f"train.out_dir={tmp_path / 'mdm'}")
    train(mdm)
    capsys.readouterr()
    main(["eval", cfg.train.out_dir, "--split", "test", "--loops", "1,2", "--baseline", mdm.train.out_dir, "--json"])
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    main(["eval", mdm.train.out_dir, "--split", "test", "--json"])
    alone = json.loads(capsys.readouterr().out.splitlines()[-1])[0]
    assert out["baseline"]["nll"] == pytest.approx(alone["nll"], rel=1e-9)  # the same rows and draws
    assert out["results"][1]["vs_baseline"] == pytest.approx(out["results"][1]["nll"] - alone["nll"])
    try:
        code = main(["eval", cfg.train.out_dir, "--plot", str(tmp_path / "loops.txt")])
    except SystemExit as exc:
        code = exc.code
    assert code == 2 and "must name a .png file" in capsys.readouterr().err


def test_train_records_carry_gradient_and_update_norms_per_part(tiny_cfg_factory, tmp_path):
    train(tiny_cfg_factory("data.tokenizer=char", "train.max_steps=4", f"train.out_dir={tmp_path / 'loop'}"))
    rec = [json.loads(line) for line in open(tmp_path / "loop" / "metrics.jsonl") if '"train"' in line][-1]
    for part in ("prelude", "loop_block", "coda", "other"):
        assert rec[f"grad_norm_{part}"] > 0 and 0 < rec[f"update_ratio_{part}"] < 1
    total = math.sqrt(sum(rec[f"grad_norm_{p}"] ** 2 for p in ("prelude", "loop_block", "coda", "other")))
    assert total == pytest.approx(min(rec["grad_norm"], 1.0), rel=1e-4)  # clipped at train.grad_clip = 1
    train(tiny_cfg_factory("data.tokenizer=char", "train.max_steps=4", "model.loop_start=null", "model.loop_end=null",
                           f"train.out_dir={tmp_path / 'mdm'}"))
    rec = [json.loads(line) for line in open(tmp_path / "mdm" / "metrics.jsonl") if '"train"' in line][-1]
    assert "grad_norm_loop_block" not in rec and rec["grad_norm_prelude"] > 0  # the MDM's layers are one stack


def test_export_best_ships_the_best_validation_weights(tiny_cfg_factory, tmp_path):
    from loopmdm.export.hf import export_run

    cfg = tiny_cfg_factory("data.tokenizer=char", "train.eval_every=2", "train.lr=3e-3")
    train(cfg)
    summary = export_run(cfg.train.out_dir, tmp_path / "best-export", best=True)
    best = load_run(cfg.train.out_dir, device="cpu", best=True)
    exported = load_run(tmp_path / "best-export", device="cpu")
    assert summary["step"] == best.step == ckpt.read_best_info(cfg.train.out_dir)["step"]
    for key, value in best.model.state_dict().items():
        assert torch.equal(value, exported.model.state_dict()[key]), key
