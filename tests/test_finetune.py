"""Conditional fine-tuning on prompt/answer pairs: the data layout, what may be masked, the
start from a pretrained run, semi-autoregressive answer decoding and exact-match scoring."""

import json

import numpy as np
import pytest
import torch

from loopmdm.cli import main
from loopmdm.config import load_config
from loopmdm.data.prepare import prepare_data
from loopmdm.diffusion.objective import forward_mask, maskable_after
from loopmdm.diffusion.schedule import make_schedule
from loopmdm.errors import LoopMDMError
from loopmdm.sampling.infill import fill_blanks
from tests.conftest import tiny_overrides


def _write_pairs(path, n=60, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            a, b = (int(v) for v in rng.integers(0, 50, 2))
            f.write(json.dumps({"prompt": f"What is {a} plus {b}?", "answer": f"{a + b}"}) + "\n")
    return path


def test_answer_positions_follow_the_first_separator():
    x = torch.tensor([[5, 6, 9, 7, 9, 9], [5, 9, 7, 8, 9, 9], [1, 2, 3, 4, 5, 6]])
    keep = maskable_after(0, x, sep_id=9)
    assert keep.tolist() == [[False, False, False, True, True, True],
                             [False, False, True, True, True, True],
                             [False] * 6]
    x_t, masked = forward_mask(x, torch.ones(3), make_schedule("loglinear", 1e-3), 10, maskable=keep)
    assert torch.equal(masked, keep)  # t = 1: the whole answer slot, never the prompt or separator
    assert torch.equal(x_t[~keep], x[~keep])


def test_pairs_are_laid_out_prompt_eos_answer_eos(tmp_path):
    pairs = _write_pairs(tmp_path / "pairs.jsonl")
    with open(pairs, "a", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": "x " * 200, "answer": "too long"}) + "\n")
    cfg = load_config(None, tiny_overrides(tmp_path) + ["data.source=pairs", f"data.paths=['{pairs}']",
                                                       "data.val_fraction=0.1"])
    data = prepare_data(cfg.data)
    assert data.prompt_sep_id == data.eos_id and data.meta["n_train_blocks"] + data.meta["n_val_blocks"] <= 60
    train_rows = {bytes(r) for r in np.asarray(data.blocks("train"))}
    assert not any(bytes(r) in train_rows for r in np.asarray(data.blocks("val")))  # disjoint splits
    tok = data.tokenizer
    for row in np.asarray(data.blocks("train"))[:5]:
        ids = row.tolist()
        sep = ids.index(data.eos_id)
        prompt, rest = tok.decode(ids[:sep]), ids[sep + 1:]
        end = rest.index(data.eos_id)
        a, b = (int(w.strip("?")) for w in prompt.split()[2::2])
        assert tok.decode(rest[:end]).strip() == str(a + b)
        assert all(i == data.eos_id for i in rest[end:])  # the slot is padded with EOS, which is trained on


def test_pairs_reject_bad_lines(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": 3}\n', encoding="utf-8")
    cfg = load_config(None, tiny_overrides(tmp_path) + ["data.source=pairs", f"data.paths=['{bad}']"])
    with pytest.raises(LoopMDMError, match=r"bad.jsonl:2 must be an object"):
        prepare_data(cfg.data)


def test_semi_autoregressive_blocks_fill_left_to_right():
    """A denoiser most confident at the last position: plain confidence fills it first, with
    blocks of 2 the first block's two blanks come before anything later."""
    L, V, mask = 6, 4, 4

    def denoiser(x, num_loops, t):
        logits = torch.zeros(x.shape[0], L, V)
        logits[:, :, 1] = torch.arange(L, dtype=torch.float32)  # confidence grows with position
        return logits

    order = {}
    for block in (0, 2):
        x = torch.tensor([[0, 0, mask, mask, mask, mask]])
        seen = []

        def spy(x, n, t):
            seen.append((x[0] == mask).nonzero().flatten().tolist())
            return denoiser(x, n, t)
        fill_blanks(spy, x, mask, "confidence", 1, block_len=block)
        order[block] = [sorted(set(a) - set(b))[0] for a, b in zip(seen, seen[1:] + [[]])]
    assert order[0] == [5, 4, 3, 2] and order[2] == [3, 2, 5, 4]
    with pytest.raises(LoopMDMError, match="block"):
        fill_blanks(denoiser, torch.tensor([[mask]]), mask, "raster", 1, block_len=2)


def test_finetune_from_a_pretrained_run_and_solve(tmp_path, capsys):
    base = tiny_overrides(tmp_path)
    assert main(["train", "tiny", *base, "train.max_steps=4"]) == 0
    run = tmp_path / "run"
    pairs = _write_pairs(tmp_path / "pairs.jsonl")
    ft = [o for o in base if not o.startswith(("train.out_dir", "data.source", "data.paths"))] + [
        "data.source=pairs", f"data.paths=['{pairs}']", f"data.tokenizer_path={run / 'tokenizer.json'}",
        f"train.init_from={run}", f"train.out_dir={tmp_path / 'ft'}", "train.max_steps=4"]
    # init_from starts from exactly the pretrained EMA weights (and a fresh EMA of them).
    from loopmdm.runs import load_run
    from loopmdm.training.run import attach_vocab
    from loopmdm.training.trainer import Trainer

    cfg = load_config("tiny", ft)
    data = prepare_data(cfg.data)
    attach_vocab(cfg, data)
    trainer = Trainer(cfg, data, tmp_path / "unused")
    trainer.init_from_run(str(run))
    pretrained = load_run(run, device="cpu").model.state_dict()
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, pretrained[k]), k
        if k in trainer.ema.shadow:
            assert torch.equal(trainer.ema.shadow[k], pretrained[k].float()), k
    assert main(["train", "tiny", *ft]) == 0
    capsys.readouterr()
    code = main(["solve", str(tmp_path / "ft"), "--order", "confidence", "--block", "2", "--loops", "1,2",
                 "--num", "6", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and [r["loops"] for r in out] == [1, 2]
    for r in out:
        assert 0.0 <= r["exact"] <= 1.0 and 0.0 <= r["token_acc"] <= 1.0 and r["task"] == "pairs" and r["block_len"] == 2
    # A fine-tuning run must share the pretrained run's tokenizer.
    other = [o for o in ft if not o.startswith(("data.tokenizer_path", "train.out_dir"))] + [f"train.out_dir={tmp_path / 'ft2'}"]
    assert main(["train", "tiny", *other]) == 2
    assert "another tokenizer" in capsys.readouterr().err


def test_pair_sources(tmp_path, capsys):
    from loopmdm.tasks import sudoku
    from loopmdm.tasks.pairs import make_pairs

    chain = make_pairs("rg:chain_sum:min_terms=2,max_terms=3,min_digits=1,max_digits=1", 40, seed=3)
    assert chain == make_pairs("rg:chain_sum:min_terms=2,max_terms=3,min_digits=1,max_digits=1", 40, seed=3)
    for p in chain:  # the answer is the value of the expression, the difficulty its number of terms
        expr = p["prompt"].rsplit(":", 1)[1].strip().rstrip("=").strip()
        assert int(p["answer"]) == eval(expr) and p["difficulty"] == len(expr.split()) // 2 + 1
    gsm = make_pairs("gsm8k-test", 5000)
    assert len(gsm) == 1319 and all(p["answer"].lstrip("-").replace(".", "").isdigit() for p in gsm)
    assert gsm[0]["answer"] == "18" and "ducks" in gsm[0]["prompt"]
    for p in make_pairs("sudoku:4", 5, seed=1):
        puzzle = np.array([0 if c == "." else int(c) for c in p["prompt"].split()])
        board = np.array([int(c) for c in p["answer"].split()])
        assert sudoku.solves(board, puzzle, 4) and p["difficulty"] >= 1
    for bad, needle in (("rg:nope", "not registered"), ("csv:x", "not allowed"), ("sudoku:5", "5")):
        assert main(["pairs", bad, "--out", str(tmp_path / "x.jsonl")]) == 2
        assert needle in capsys.readouterr().err


def test_gsm8k_train_formats_offline(tmp_path, capsys, monkeypatch):
    """GSM8K's Hub format (jsonl and parquet, read through `datasets` as online) and SMDM's
    augmented train.txt: final-number answers, or the reasoning with :cot; difficulty = steps."""
    import pandas as pd

    from loopmdm.tasks.pairs import make_pairs

    rows = [{"question": "Tom has 3 apples and buys 4. He eats 2. How many?", "answer": "3+4=<<3+4=7>>7\n7-2=<<7-2=5>>5\n#### 5"},
            {"question": "A pen costs $1,200 cents?", "answer": "No steps.\n#### 1,200"}]
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "g.parquet")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    for name in ("g.jsonl", "g.parquet"):
        pairs = make_pairs(f"gsm8k:{tmp_path / name}", 10)
        assert [(p["answer"], p["difficulty"]) for p in pairs] == [("5", 2), ("1200", 0)]
    cot = make_pairs(f"gsm8k:{tmp_path / 'g.jsonl'}:cot", 1)[0]["answer"]
    assert cot == "3+4=<<3+4=7>>7 7-2=<<7-2=5>>5 #### 5"
    (tmp_path / "train.txt").write_text("Q one?||<<2*3=6>> <<6+1=7>> #### 7\nQ two?||<<5-1=4>> #### 4\n")
    aug = make_pairs(f"gsm8k-aug:{tmp_path / 'train.txt'}", 10)
    assert aug == [{"prompt": "Q one?", "answer": "7", "difficulty": 2}, {"prompt": "Q two?", "answer": "4", "difficulty": 1}]
    assert make_pairs(f"gsm8k-aug:{tmp_path / 'train.txt'}:cot", 1)[0]["answer"] == "<<2*3=6>> <<6+1=7>> #### 7"
    (tmp_path / "bad.txt").write_text("no separator here\n")
    for bad, needle in ((f"gsm8k-aug:{tmp_path / 'bad.txt'}", "question||reasoning"), ("gsm8k:dev", "neither a file"),
                        (f"gsm8k-aug:{tmp_path / 'nope.txt'}", "not a file")):
        assert main(["pairs", bad, "--out", str(tmp_path / "x.jsonl")]) == 2
        assert needle in capsys.readouterr().err


def test_finetune_command_reports_accuracy_by_difficulty(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the fine-tuned run goes next to --init; generated pairs to the data cache
    base = tiny_overrides(tmp_path)
    assert main(["train", "tiny", *base, "train.max_steps=3"]) == 0
    source = "rg:chain_sum:min_terms=2,max_terms=3,min_digits=1,max_digits=1"
    assert main(["finetune", source, "--init", str(tmp_path / "run"), "--num", "200", "train.max_steps=3",
                 "data.seq_len=64", "data.val_fraction=0.2"]) == 0
    capsys.readouterr()
    ft = tmp_path / "run-ft-chain_sum"
    assert main(["solve", str(ft), "--order", "confidence", "--loops", "1", "--num", "40", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)[0]
    assert set(record["by_difficulty"]) == {"2", "3"} and sum(v["n"] for v in record["by_difficulty"].values()) == record["n"] > 0


def test_solve_scores_external_pairs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = tiny_overrides(tmp_path)
    pairs = _write_pairs(tmp_path / "pairs.jsonl")
    ft = [o for o in base if not o.startswith(("data.source", "data.paths"))] + [
        "data.source=pairs", f"data.paths=['{pairs}']", "train.max_steps=2"]
    assert main(["train", "tiny", *ft]) == 0
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"prompt": "What is 1 plus 2?", "answer": "3", "difficulty": 2}) + "\n"
                    + json.dumps({"prompt": "long " * 100, "answer": "0"}) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["solve", str(tmp_path / "run"), "--pairs", str(test), "--order", "raster", "--loops", "1,2",
                 "--json"]) == 0
    out, err = capsys.readouterr()
    records = json.loads(out)
    assert [r["n"] for r in records] == [1, 1] and "1 pairs longer" in err
    assert list(records[0]["by_difficulty"]) == ["2"]
    assert main(["solve", str(tmp_path / "run"), "--pairs", str(test), "--answer-len", "3", "--order", "raster",
                 "--loops", "1", "--json"]) == 0
    record = json.loads(capsys.readouterr()[0])[0]
    assert record["nfe"] == 3  # one call per blank: only 3 answer positions are blank
    assert main(["solve", str(tmp_path / "run"), "--pairs", str(tmp_path / "nope.jsonl")]) == 2


def test_pairs_exact_match_oracle():
    """Exact match of the answer slot on a hand-built case: tokens 0..9, EOS 10, mask 11; the
    answer is everything after the first EOS up to the next EOS (what follows it is padding)."""
    from loopmdm.evaluation.solve import score
    from loopmdm.tasks.pairs import blank_answer

    eos, mask = 10, 11
    row = [1, 2, 3, eos, 4, 5, eos, eos, eos]  # prompt 1 2 3, answer 4 5
    filled = np.array([
        [1, 2, 3, eos, 4, 5, eos, eos, eos],  # the right answer: exact
        [1, 2, 3, eos, 4, 6, eos, eos, eos],  # a wrong token: not exact
        [1, 2, 3, eos, 4, 5, 7, eos, eos],  # extra trailing token before the EOS: not exact
        [1, 2, 3, eos, 4, eos, eos, eos, eos],  # a prefix of the answer: not exact
        [1, 2, 3, eos, 4, 5, eos, 7, 7],  # right, then tokens after its EOS (ignored): exact
        [1, 2, 3, eos, 4, 5, 7, 7, 7],  # right, then no EOS at all: not exact
    ])
    target = np.array([row] * len(filled))
    x = blank_answer(target, eos, mask)
    assert (x[:, :4] == target[:, :4]).all() and (x[:, 4:] == mask).all()  # the whole slot is blank
    test = {"task": "pairs", "x": x, "target": target, "difficulty": np.array([1, 1, 2, 2, 3, 3]), "eos_id": eos}
    r = score(test, filled, mask)
    assert r["exact"] == pytest.approx(2 / 6) and r["n"] == 6
    assert r["by_difficulty"] == {"1": {"n": 2, "exact": 0.5}, "2": {"n": 2, "exact": 0.0},
                                  "3": {"n": 2, "exact": 0.5}}
    # answer-token accuracy: slot cells equal to the target, over the 6 x 5 blank cells
    assert r["token_acc"] == pytest.approx((5 + 4 + 4 + 4 + 3 + 2) / 30)
    # a target whose answer fills the slot to the end (no closing EOS) and a prompt-only row
    full = np.array([[1, eos, 4, 5, 6]])
    t2 = {"task": "pairs", "x": blank_answer(full, eos, mask), "target": full, "difficulty": np.array([-1]),
          "eos_id": eos}
    assert score(t2, full, mask)["exact"] == 1.0
    assert score(t2, np.array([[1, eos, 4, 5, eos]]), mask)["exact"] == 0.0  # a prefix again
    assert set(score(t2, full, mask)["by_difficulty"]) == {"?"}
    # answer_len 2: only the first 2 slot cells are blank, the rest given as EOS padding
    x2 = blank_answer(target[:1], eos, mask, answer_len=2)
    assert x2[0].tolist() == [1, 2, 3, eos, mask, mask, eos, eos, eos]
    t3 = {"task": "pairs", "x": x2, "target": target[:1], "difficulty": np.array([0]), "eos_id": eos}
    assert score(t3, filled[:1], mask)["exact"] == 1.0 and score(t3, filled[:1], mask)["token_acc"] == 1.0
    assert score(t3, filled[3:4], mask)["exact"] == 0.0  # the prefix 4 EOS
