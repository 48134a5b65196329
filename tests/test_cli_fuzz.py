"""Every subcommand of the parser, every option that takes a value, a table of bad values per
kind (empty, negative, NaN/inf, huge, wrong type, missing path, a folder for a file and a file
for a folder, a binary file, an unknown name): each must end with exit status 2, one `error:`
line, no traceback, and nothing written or changed outside the test's temporary folder.

Commands and options come from the parser (tests/cli_fuzz.py), so a new command is covered by
construction. Each command starts from valid arguments and changes one option at a time."""

import io
import os
import signal
from contextlib import redirect_stderr, redirect_stdout

import pytest

from loopmdm.cli import build_parser, main
from tests import cli_fuzz
from tests.conftest import tiny_overrides

# Enough to make the command cheap if a bad value were accepted: it then runs and the test fails.
EXTRA_BASE = {
    "zeroshot": ["--sets", "ptb={text}", "--max-docs", "2", "--batches", "1"],
    "sample-bench": ["--steps", "2", "--loops", "1", "--num", "1", "--taus", "0.5"],
    "downstream": ["--tasks", "arc_easy", "--limit", "1", "--mc-samples", "1", "--loops", "1"],
    "experiment": ["--report-only"],
    "eval": ["--batches", "1"], "analyze": ["--batches", "1", "--loops", "2"], "solve": ["--num", "2", "--loops", "1"],
    "sample": ["--steps", "2", "--num", "1"],
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny language-model run, a tiny task run, and the files the bad values point at."""
    root = tmp_path_factory.mktemp("fuzz")
    assert main(["train", "tiny", *tiny_overrides(root), "train.max_steps=2", "train.eval_every=0"]) == 0
    lm_overrides = [o for o in tiny_overrides(root) if not o.startswith("data.")]
    assert main(["train", "tiny", *[o for o in lm_overrides if not o.startswith("train.out_dir")],
                 "data.source=task", "data.task=khop", "data.task_size=6", "data.task_hops=2",
                 "data.task_examples=300", f"data.cache_dir={root / 'cache'}", "train.max_steps=2",
                 "train.eval_every=0", f"train.out_dir={root / 'task-run'}"]) == 0
    inputs = root / "inputs"
    (inputs / "empty_dir").mkdir(parents=True)
    (inputs / "file").write_text("a plain file\n")
    (inputs / "binary").write_bytes(bytes(range(256)) * 8)
    (inputs / "text.txt").write_text("Some plain English text for scoring. " * 20)
    (inputs / "pairs.jsonl").write_text("".join(f'{{"prompt": "{i} plus {i}", "answer": "{2 * i}"}}\n'
                                                for i in range(20)))
    return root


def _snapshot(*folders):
    found = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            st = path.lstat()
            found[str(path)] = (st.st_size, st.st_mtime_ns, path.is_dir())
    return found


def _placeholders(world):
    inputs = world / "inputs"
    return {"{missing}": str(inputs / "missing"), "{file}": str(inputs / "file"),
            "{empty_dir}": str(inputs / "empty_dir"), "{binary}": str(inputs / "binary"),
            "{text}": str(inputs / "text.txt")}


def _fill(value: str, places: dict) -> str:
    for key, path in places.items():
        value = value.replace(key, path)
    return value


class CaseTimeout(BaseException):
    """A bad value that was accepted and started real work (no OSError: the boundary would catch that)."""


def _timeout(signum, frame):
    raise CaseTimeout()


CASE_LIMIT_S = 120  # a refusal takes well under a second; this only turns a hang into a failure


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(CASE_LIMIT_S)
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code
        except CaseTimeout:
            code = f"still running after {CASE_LIMIT_S} s"
        except Exception as exc:  # a traceback is what this test exists to find
            import traceback

            traceback.print_exc(file=err)
            code = f"raised {type(exc).__name__}"
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    return code, err.getvalue()


PARSER = build_parser()
COMMANDS = cli_fuzz.subcommands(PARSER)


def test_every_option_of_every_command_is_classified():
    unknown = [(o.command, o.dest) for name, sub in COMMANDS.items() for o in cli_fuzz.options(name, sub)
               if o.kind == "unknown"]
    assert not unknown, f"classify these options in tests/cli_fuzz.py KINDS: {unknown}"
    assert len(COMMANDS) >= 15


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_bad_values_give_one_line_and_change_nothing(world, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)  # relative outputs (RUN-ft-NAME) would land here
    places = _placeholders(world)
    new = world / "new" / command
    fill = {"run": str(world / "run"), "init": str(world / "run"), ("solve", "run"): str(world / "task-run"),
            "config": "tiny", "overrides": tiny_overrides(new), "source": "sudoku:4",
            ("finetune", "source"): str(world / "inputs" / "pairs.jsonl"),
            ("finetune", "overrides"): [f"train.out_dir={new / 'ft'}", f"data.cache_dir={new / 'cache'}", "train.max_steps=1"], "out": str(new / "out.jsonl"),
            "out_dir": str(new / "export"), "suites": "arith", "lm_eval_args": []}
    sub = COMMANDS[command]
    base = cli_fuzz.base_argv(command, sub, fill)
    extra = [_fill(a, places) for a in EXTRA_BASE.get(command, [])]
    guarded = [world / "run", world / "task-run", world / "inputs"]
    before = _snapshot(*guarded)
    failures, cases = [], 0
    for option in cli_fuzz.options(command, sub):
        for value in cli_fuzz.BAD.get(option.kind, []):
            value = _fill(value, places)
            argv = cli_fuzz.build(command, sub, base, option, value, extra)
            cases += 1
            code, err = _run(argv)
            lines = [ln for ln in err.strip().splitlines() if ln.strip()]
            ok = (code == 2 and "Traceback" not in err and lines and lines[-1].startswith("error: ")
                  and sum(ln.startswith("error: ") for ln in lines) == 1)
            if not ok:
                failures.append(f"{' '.join(argv[:1])} {option.flag or option.dest}={value!r}: exit {code}: "
                                f"{err.strip().splitlines()[-1] if err.strip() else ''}")
            if os.listdir(tmp_path) or new.exists():
                failures.append(f"{command} {option.flag or option.dest}={value!r} left "
                                f"{os.listdir(tmp_path) or sorted(p.name for p in new.rglob('*'))}")
                for leftover in [*tmp_path.iterdir(), new]:
                    if leftover.exists():
                        import shutil

                        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    assert _snapshot(*guarded) == before, "a bad value changed a file outside the test's folder"
    assert not failures, f"{len(failures)} of {cases} bad values of `{command}`:\n" + "\n".join(failures)
