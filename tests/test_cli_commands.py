"""Every command of the CLI table: its --help works, and a bad value ends in one `error:` line."""

import pytest

from loopmdm.cli import COMMANDS, build_parser, main

# One bad input per command (lm-eval passes its arguments to lm-eval's own CLI: not ours to check).
BAD = {
    "prepare": (["nosuch"], "unknown preset 'nosuch'"),
    "train": (["tiny", "model.n_heads=5"], "model.d_model=256 must be divisible by model.n_heads=5"),
    "pairs": (["nosuch", "--out", "x.jsonl"], "pair source 'nosuch' is not allowed"),
    "finetune": (["x.jsonl", "--init", "/no/such/run"], "/no/such/run"),
    "eval": (["/no/such/run"], "/no/such/run"),
    "zeroshot": (["/no/such/run", "--draws", "0"], "--draws 0"),
    "sample": (["/no/such/run", "--sampler", "nosuch"], "invalid choice: 'nosuch'"),
    "sample-bench": (["/no/such/run"], "/no/such/run"),
    "solve": (["/no/such/run", "--order", "sideways"], "invalid choice: 'sideways'"),
    "analyze": (["/no/such/run", "--max-loops", "0"], "--max-loops 0 must be >= 1"),
    "experiment": (["lm", "--arms", "nosuch"], "arm 'nosuch' is not allowed"),
    "export": (["/no/such/run", "out", "--default-loops", "0"], "--default-loops 0 must be an integer >= 1"),
    "downstream": (["/no/such/run", "--limit", "0"], "--limit 0 must be >= 1"),
    "flops": (["tiny", "model.loop_end=99"], "loop range [1, 99)"),
}


def _main(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_every_command_is_in_the_bad_value_table():
    assert set(COMMANDS) - {"lm-eval"} == set(BAD)


@pytest.mark.parametrize("command", sorted(set(COMMANDS) - {"lm-eval"}))
def test_help(command, capsys):
    code, out, _ = _main(capsys, [command, "--help"])
    assert code == 0 and out.startswith(f"usage: loopmdm {command}") and "".join(COMMANDS[command].help.split()) in "".join(out.split())


@pytest.mark.parametrize("command", sorted(BAD))
def test_a_bad_value_gives_one_line(command, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing is written where the tests run
    argv, needle = BAD[command]
    code, _, err = _main(capsys, [command, *argv])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert lines and lines[-1].startswith("error: ") and sum(ln.startswith("error: ") for ln in lines) == 1, err
    assert needle in lines[-1], (needle, lines[-1])


def test_old_spellings_still_work_with_a_note(capsys):
    parser = build_parser()
    args = parser.parse_args(["sample", "RUN", "--loops", "noise:1:4"])
    assert args.loop_schedule == "noise:1:4"
    args = parser.parse_args(["analyze", "RUN", "--loops", "5"])
    assert args.max_loops == 5
    args = parser.parse_args(["export", "RUN", "OUT", "--num-loops", "3"])
    assert args.default_loops == 3
    err = capsys.readouterr().err.splitlines()
    assert err == [f"note: {old} is deprecated here; use {new} (the old spelling goes in the next release)"
                   for old, new in (("--loops", "--loop-schedule"), ("--loops", "--max-loops"),
                                    ("--num-loops", "--default-loops"))]


def test_flops_of_a_task_config(capsys):
    """No KeyError: the task's vocabulary is known without preparing data."""
    code, out, err = _main(capsys, ["flops", "experiments/khop", "--json"])
    assert code == 0, err
    assert '"vocab_size": 44' in out  # khop, 6 nodes: 6 + 36 edge tokens + EOS + pad


def test_a_bad_sweep_seed_list_gives_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = _main(capsys, ["experiment", "khop", "--sweep-seeds", "0,x", "--report-only"])
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: --sweep-seeds '0,x' must be comma-separated integers")
