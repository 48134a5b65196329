"""The CLI end to end on a tiny run, and the one-line errors every bad input must give."""

import json
import shutil

import pytest

from loopmdm.cli import main
from tests.conftest import tiny_overrides


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    assert main(["train", "tiny", *tiny_overrides(root), "train.max_steps=6"]) == 0
    return root


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    # Progress lines (e.g. "[data ...] using cached ...") may come first; the error is one line, last.
    assert "Traceback" not in err and lines and lines[-1].startswith("error: "), err
    assert sum(ln.startswith("error: ") for ln in lines) == 1, err
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


def test_eval_json_reports_each_loop_count(trained_run, capsys):
    code, out, _ = run_cli(capsys, "eval", str(trained_run / "run"), "--loops", "1,2,6", "--json")
    assert code == 0
    records = json.loads(out)
    assert [r["loops"] for r in records] == [1, 2, 6]
    for r in records:
        assert r["nll"] > 0 and r["ppl"] == pytest.approx(2.718281828459045 ** r["nll"])
        assert r["draws"] == 1 and r["seed"] == 1234 and r["tokens"] > 0
    again = json.loads(run_cli(capsys, "eval", str(trained_run / "run"), "--loops", "1,2,6", "--json")[1])
    assert [r["nll"] for r in again] == [r["nll"] for r in records]  # seeded: reproducible


def test_sample_keeps_the_prompt(trained_run, capsys):
    code, out, _ = run_cli(capsys, "sample", str(trained_run / "run"), "--loops", "3", "--steps", "8", "--num", "2",
                           "--prompt", "The new phone", "--json", "--length", "24")
    assert code == 0
    result = json.loads(out)
    assert len(result["samples"]) == 2
    assert all(s.startswith("The new phone") for s in result["samples"])
    assert result["loop_passes"] == 3 * result["nfe"]


def test_flops_json(capsys):
    code, out, _ = run_cli(capsys, "flops", "paper-owt", "--json")
    assert code == 0
    summary = json.loads(out)
    assert 1.6e8 < summary["params"] < 1.8e8  # MDLM small with GPT-2 vocabulary: ~170M
    assert summary["train_flops_per_token_s1"] < summary["train_flops_per_token_expected"] < summary["train_flops_per_token_smax"]


@pytest.mark.parametrize("override,needles", [
    ("model.colour=red", ["model.colour"]),
    ("train.max_steps=abc", ["train.max_steps", "abc"]),
    ("model.loop_end=9", ["loop range [1, 9)", "n_layers=6"]),
    ("model.max_train_loops=0", ["model.max_train_loops=0"]),
    ("model.block=gpt", ["model.block='gpt'", "dit, llama"]),
    ("data.paths=[*.txt]", ["data.paths", "quote it"]),
    ("noequals", ["noequals", "key=value"]),
])
def test_bad_config_values_give_one_line(capsys, override, needles):
    assert_one_line_error(*run_cli(capsys, "train", "tiny", override)[::2], *needles)


def test_unknown_preset(capsys):
    assert_one_line_error(*run_cli(capsys, "train", "nosuch")[::2], "unknown preset 'nosuch'", "tiny")


@pytest.mark.parametrize("loops", ["0", "1,-2", "x"])
def test_eval_rejects_loop_counts_below_one(trained_run, capsys, loops):
    assert_one_line_error(*run_cli(capsys, "eval", str(trained_run / "run"), "--loops", loops)[::2], f"'{loops}'")


def test_sample_rejects_zero_loops(trained_run, capsys):
    assert_one_line_error(*run_cli(capsys, "sample", str(trained_run / "run"), "--loops", "0")[::2], "0")


def test_missing_run_and_missing_checkpoint(tmp_path, capsys):
    assert_one_line_error(*run_cli(capsys, "eval", str(tmp_path / "nope"))[::2], "nope", "does not exist")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(*run_cli(capsys, "sample", str(tmp_path / "empty"))[::2], "no checkpoint")


def test_corrupt_checkpoint(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run / "run", run)
    latest = (run / "checkpoints" / "latest").read_text().strip()
    (run / "checkpoints" / latest / "ema.safetensors").write_bytes(b"\x00" * 10)
    code, _, err = run_cli(capsys, "eval", str(run), "--loops", "1", "--json")  # the previous one is used, and said so
    assert code == 0 and "ema.safetensors" in err and "corrupt" in err and "using step-0000004" in err
    (run / "checkpoints" / "step-0000004" / "ema.safetensors").write_bytes(b"\x00" * 10)
    assert_one_line_error(*run_cli(capsys, "eval", str(run))[::2], "no intact checkpoint", "ema.safetensors", "corrupt")
    original = (trained_run / "run" / "checkpoints" / latest / "ema.safetensors").read_bytes()
    assert original != b"\x00" * 10  # the original run is untouched


def test_empty_corpus(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    code, _, err = run_cli(capsys, "prepare", "tiny", "data.source=text", f"data.paths=['{tmp_path}/empty.txt']",
                           f"data.cache_dir={tmp_path / 'cache'}")
    assert_one_line_error(code, err, "empty")


def test_tokenizer_mismatch_between_run_and_data(trained_run, capsys):
    overrides = [o for o in tiny_overrides(trained_run) if not o.startswith("data.bpe_vocab_size")]
    assert run_cli(capsys, "prepare", "tiny", *overrides, "data.bpe_vocab_size=320")[0] == 0
    other = next(p for p in (trained_run / "cache").iterdir() if p.is_dir() and
                 json.loads((p / "meta.json").read_text())["vocab_size"] == 320)
    assert_one_line_error(*run_cli(capsys, "eval", str(trained_run / "run"), "--data", str(other))[::2],
                          "tokenizer mismatch", "320")


def test_resume_without_checkpoint(tmp_path, capsys):
    assert_one_line_error(*run_cli(capsys, "train", "tiny", f"train.out_dir={tmp_path}/fresh", "--resume")[::2],
                          "no checkpoint", "fresh")


def test_sample_infills_between_prompt_and_suffix(trained_run, capsys):
    code, out, _ = run_cli(capsys, "sample", str(trained_run / "run"), "--loops", "2", "--steps", "6", "--num", "2",
                           "--prompt", "Apple said", "--suffix", " on Monday.", "--json", "--length", "20",
                           "--sampler", "confidence")
    assert code == 0
    for text in json.loads(out)["samples"]:
        assert text.startswith("Apple said") and text.endswith(" on Monday.")


def test_resume_from_corrupt_training_state(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run / "run", run)
    latest = (run / "checkpoints" / "latest").read_text().strip()
    (run / "checkpoints" / latest / "train_state.pt").write_bytes(b"not a torch file")
    overrides = [o for o in tiny_overrides(trained_run) if not o.startswith("train.out_dir")]
    code, _, err = run_cli(capsys, "train", "tiny", *overrides, f"train.out_dir={run}", "train.max_steps=8", "--resume")
    assert code == 0 and "train_state.pt' is corrupt" in err and "using step-0000004" in err  # fell back, said so
    for folder in (run / "checkpoints").glob("step-*"):
        (folder / "train_state.pt").write_bytes(b"not a torch file")
    code, _, err = run_cli(capsys, "train", "tiny", *overrides, f"train.out_dir={run}", "train.max_steps=10", "--resume")
    assert_one_line_error(code, err, "train_state.pt", "corrupt")


def test_eval_on_new_text_with_the_runs_tokenizer(trained_run, tmp_path, capsys):
    """Any corpus can be evaluated once prepared with the run's own tokenizer."""
    (tmp_path / "a.txt").write_text("The film won three awards at the festival on Sunday night. " * 20)
    (tmp_path / "b.txt").write_text("Shares in the company rose after strong results were announced. " * 20)
    code, out, _ = run_cli(capsys, "prepare", "tiny", "data.source=text", f"data.paths=['{tmp_path}/*.txt']",
                           "data.seq_len=32", "data.val_fraction=0.5", f"data.cache_dir={tmp_path / 'cache'}",
                           f"data.tokenizer_path={trained_run / 'run' / 'tokenizer.json'}")
    assert code == 0
    prepared = json.loads(out)["path"]
    code, out, _ = run_cli(capsys, "eval", str(trained_run / "run"), "--data", prepared, "--loops", "1,3", "--json")
    assert code == 0 and [r["loops"] for r in json.loads(out)] == [1, 3]
    assert all(r["data"] == prepared for r in json.loads(out))


def test_an_empty_override_of_a_text_setting_is_the_empty_string(tmp_path):
    """`data.cache_dir=` (nothing after '=') is '' (the default: the user cache), not null;
    an empty override of a setting that allows null still means null."""
    from loopmdm.config import load_config

    assert load_config("tiny", ["data.cache_dir="]).data.cache_dir == ""
    assert load_config("tiny", [f"data.cache_dir={tmp_path}", "data.cache_dir="]).data.cache_dir == ""
    assert load_config("tiny", ["model.loop_start=", "model.loop_end="]).model.loop_start is None
