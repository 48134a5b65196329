"""Runs that never lose data or get stuck: overwrite, locking, crash windows, full disks,
non-finite training, one-line errors, eval on any text (issue "Runs that never lose data")."""

import ast
import errno
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loopmdm import runfiles
from loopmdm.cli import main
from loopmdm.errors import LoopMDMError
from loopmdm.runs import load_run
from loopmdm import checkpoint as ckpt
from tests.conftest import tiny_overrides
from tests.test_cli import assert_one_line_error, run_cli


def _imports(tree, package_root: Path) -> set:
    """loopmdm modules an AST imports anywhere (function-local imports included)."""
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "loopmdm" and (package_root.joinpath(*parts[1:]).with_suffix(".py").is_file()
                                          or package_root.joinpath(*parts[1:], "__init__.py").is_file()):
                found.add(name)
    return found


def test_inference_code_does_not_import_the_trainer():
    """Static closure (no torch import): runs.py and the eval / sample commands never reach
    loopmdm.training.trainer."""
    import loopmdm

    root = Path(loopmdm.__file__).parent
    cli = ast.parse((root / "cli.py").read_text())
    entry = [n for n in cli.body if isinstance(n, ast.FunctionDef) and n.name in ("cmd_eval", "cmd_sample")]
    todo = set().union(*(_imports(n, root) for n in entry)) | {"loopmdm.runs"}
    seen = set()
    while todo:
        name = todo.pop()
        seen.add(name)
        parts = name.split(".")[1:]
        path = root.joinpath(*parts).with_suffix(".py")
        path = path if path.is_file() else root.joinpath(*parts, "__init__.py")
        todo |= _imports(ast.parse(path.read_text()), root) - seen
    assert "loopmdm.checkpoint" in seen  # the walk works
    assert "loopmdm.training.trainer" not in seen and "loopmdm.training.run" not in seen


# ----------------------------------------------------------------------------- a shared tiny run
# 6 steps, checkpoints at 4 and 6 (both kept), validation at 6.

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    assert main(["train", "tiny", *tiny_overrides(root), "train.max_steps=6", "train.eval_every=0"]) == 0
    return root


def copy_run(trained, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    return run


def train_argv(trained, run, *extra):
    overrides = [o for o in tiny_overrides(trained) if not o.startswith("train.out_dir")]
    return ["train", "tiny", *overrides, "train.max_steps=6", "train.eval_every=0", f"train.out_dir={run}", *extra]


# ----------------------------------------------------------------------------- 1. --overwrite

def test_overwrite_refuses_a_folder_that_is_not_a_run(trained, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (mine / "config.yaml").write_text("my: own config\n")
    for flags in ([], ["--overwrite"]):
        code, _, err = run_cli(capsys, *train_argv(trained, mine, *flags))
        assert_one_line_error(code, err, "not a loopmdm run directory", "thesis.tex")
        assert "pass --overwrite" not in err  # never suggested for a folder that is not a run
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml", "thesis.tex"]
    assert (mine / "config.yaml").read_text() == "my: own config\n"
    # A file is not a folder; a path under a file cannot be created: one line each.
    assert_one_line_error(*run_cli(capsys, *train_argv(trained, mine / "thesis.tex"))[::2], "is a file")
    assert_one_line_error(*run_cli(capsys, *train_argv(trained, mine / "thesis.tex" / "run"))[::2],
                          "cannot create the run directory")


def test_overwrite_checks_the_inputs_first_and_keeps_other_files(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    (run / "notes.txt").write_text("lr sweep ideas")
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    (tmp_path / "empty.txt").write_text("")
    code, _, err = run_cli(capsys, *train_argv(trained, run, "--overwrite", "data.source=text",
                                               f"data.paths=['{tmp_path}/empty.txt']"))
    assert_one_line_error(code, err, "empty or too small corpus")
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # untouched
    assert run_cli(capsys, *train_argv(trained, run, "--overwrite", "train.max_steps=2"))[0] == 0
    assert (run / "notes.txt").read_text() == "lr sweep ideas"  # not ours: kept
    assert [p.name for p in ckpt.step_folders(run)] == ["step-0000002"]
    assert max(r["step"] for r in runfiles.read_jsonl(run / "metrics.jsonl")) == 2


# ----------------------------------------------------------------------------- 2. one writer

def test_a_second_writer_is_refused_until_the_first_dies(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); f.write('loopmdm run lock pid 4242\\n'); f.flush(); "
         "print('locked', flush=True); time.sleep(60)", str(run / ".lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        metrics = (run / "metrics.jsonl").read_bytes()
        code, _, err = run_cli(capsys, *train_argv(trained, run, "train.max_steps=8", "--resume"))
        assert_one_line_error(code, err, "in use by another loopmdm process", "pid 4242")
        assert (run / "metrics.jsonl").read_bytes() == metrics
    finally:
        holder.kill()  # like a crash: the OS releases the lock
        holder.wait()
    assert run_cli(capsys, *train_argv(trained, run, "train.max_steps=8", "--resume"))[0] == 0
    steps = [r["step"] for r in runfiles.read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 9))  # no duplicated or interleaved steps


# ----------------------------------------------------------------------------- 3. crash windows

def test_the_previous_checkpoint_is_used_when_the_newest_is_damaged(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    newest = run / "checkpoints" / "step-0000006"
    (newest / "model.safetensors").write_bytes((newest / "model.safetensors").read_bytes()[:100])  # torn file
    loaded = load_run(run, device="cpu", use_ema=False)
    assert loaded.step == 4
    assert "model.safetensors' is corrupt" in capsys.readouterr().err
    code, out, err = run_cli(capsys, *train_argv(trained, run, "--resume"))  # resume falls back too
    assert code == 0 and "using step-0000004" in err and json.loads(out[out.index("{"):])["step"] == 6
    assert load_run(run, device="cpu").step == 6  # repaired by the resumed run


@pytest.mark.parametrize("latest", [b"\xff\xfe\x00garbage", b"checkpoint-final\n", b"step-0000009\n", None])
def test_a_bad_latest_pointer_falls_back_with_a_note(trained, tmp_path, capsys, latest):
    run = copy_run(trained, tmp_path)
    if latest is None:
        (run / "checkpoints" / "latest").unlink()
    else:
        (run / "checkpoints" / "latest").write_bytes(latest)
    code, out, err = run_cli(capsys, "sample", str(run), "--steps", "2", "--num", "1", "--json", "--length", "8")
    assert code == 0 and "latest" in err and "using step-0000006" in err and "Traceback" not in err


def test_a_kill_while_replacing_a_checkpoint_step_is_recovered(trained, tmp_path, capsys):
    """The window of finding 3a: the old step folder moved aside, the new one not yet in."""
    run = copy_run(trained, tmp_path)
    root = run / "checkpoints"
    os.replace(root / "step-0000006", root / ".old-step-0000006-99999")
    assert load_run(run, device="cpu").step == 4  # readers: the previous intact checkpoint
    assert "using step-0000004" in capsys.readouterr().err
    code, out, err = run_cli(capsys, *train_argv(trained, run, "--resume"))  # the writer moves it back
    assert code == 0 and "restored as step-0000006" in err and json.loads(out[out.index("{"):])["step"] == 6


def test_resume_of_a_finished_run_changes_nothing(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    # (config.yaml is rewritten: this copy's train.out_dir differs from the original's.)
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name not in (".lock", "config.yaml")}
    stamps = {p: p.stat().st_mtime_ns for p in files}
    code, out, err = run_cli(capsys, *train_argv(trained, run, "--resume"))
    assert code == 0 and "nothing to do" in err
    assert json.loads(out[out.index("{"):])["val_nll"] > 0
    assert {p: p.read_bytes() for p in files} == files  # no duplicate validation record, no re-save
    assert {p: p.stat().st_mtime_ns for p in files} == stamps


def test_resume_may_change_settings_that_do_not_change_the_data(trained, tmp_path, capsys):
    """data.num_proc (and cache_dir) are outside the prepared data's key: the bytes are the same."""
    run = copy_run(trained, tmp_path)
    code, _, err = run_cli(capsys, *train_argv(trained, run, "train.max_steps=7", "data.num_proc=1", "--resume"))
    assert code == 0, err
    assert ckpt.step_of(ckpt.checkpoint_path(run)) == 7


def test_resume_of_a_text_run_ignores_task_settings_it_never_read(trained, tmp_path, capsys):
    """A run saved when data.task_hops defaulted to 4 resumes now that it defaults to 3: task
    settings are not read by a text source (nor in its data key); a changed text setting still refuses."""
    import yaml

    run = copy_run(trained, tmp_path)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["source"] != "task"
    saved["data"]["task_hops"] = saved["data"]["task_hops"] + 1
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    code, _, err = run_cli(capsys, *train_argv(trained, run, "train.max_steps=7", "--resume"))
    assert code == 0, err
    assert ckpt.step_of(ckpt.checkpoint_path(run)) == 7
    code, _, err = run_cli(capsys, *train_argv(trained, run, "train.max_steps=8", "data.seq_len=16", "--resume"))
    assert code == 2 and "--resume with a different setting (data.seq_len" in err


def test_a_failed_resume_writes_nothing(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    config = (run / "config.yaml").read_bytes()
    code, _, err = run_cli(capsys, *train_argv(trained, run, "model.d_model=64", "--resume"))
    assert_one_line_error(code, err, "only train.* may change")
    assert (run / "config.yaml").read_bytes() == config


# ----------------------------------------------------------------------------- kill anywhere
# Fault injection: `runfiles.fault_point` exits the process (os._exit, as kill -9) at its N-th
# call. Every run-file write passes through such points: in the middle of a file (a torn
# write), after the temporary file is complete, after the rename; between a checkpoint's
# renames, while pruning, while --overwrite deletes. Each child is forked from a forkserver
# that has imported torch once, so a kill costs a fraction of a second.

SCENARIO = ["train.max_steps=3", "train.checkpoint_every=1", "train.eval_every=0", "train.log_every=1"]


def _kind(label: str) -> str:
    """Fault points grouped by what a kill there leaves behind: a torn file of each kind, and
    each step of the write protocol (the same code for every file) once."""
    label = re.sub(r"\d+", "N", label)
    label = re.sub(r"^write [^:]+: (complete|renamed)", r"write *: \1", label)
    label = re.sub(r"^checkpoint step-N/[^:]+: partial", "checkpoint step-N/*: partial", label)
    return re.sub(r"^overwrite: deleted (config.yaml|data.json|tokenizer.json|metrics.jsonl)", "overwrite: deleted run file", label)


EVERY_POINT = os.environ.get("LOOPMDM_KILL_EVERY_POINT") == "1"  # the exhaustive run: every fault point


def _crash_child(fault_at: int, argv: list, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    runfiles.set_fault(at=fault_at)
    os._exit(main(argv))


def _run_killed(argv, fault_at, log) -> int:
    ctx = multiprocessing.get_context("forkserver")
    child = ctx.Process(target=_crash_child, args=(fault_at, argv, str(log)))
    child.start()
    child.join(120)
    return child.exitcode


def _traced(argv) -> list[str]:
    trace = []
    runfiles.set_fault(trace=trace)
    try:
        assert main(argv) == 0
    finally:
        runfiles.set_fault()
    return trace


def _records(run):
    drop = {"time", "tokens_per_sec", "flops_per_sec"}
    return [{k: v for k, v in r.items() if k not in drop} for r in runfiles.read_jsonl(run / "metrics.jsonl")]


def _recover(argv, run, capsys) -> None:
    """What a user does after a crash: rerun the command; if it refuses, follow its one line."""
    code, _, err = run_cli(capsys, *argv)
    if code == 0:
        return
    line = err.strip().splitlines()[-1]
    flag = "--resume" if "pass --resume" in line or "pass --overwrite" not in line else "--overwrite"
    assert flag in line, line
    base = [a for a in argv if a not in ("--resume", "--overwrite")]
    assert run_cli(capsys, *base, flag)[0] == 0, capsys.readouterr().err


@pytest.fixture(scope="module")
def kill_setup(trained, tmp_path_factory):
    # torch._dynamo: AdamW imports it on first use, which would cost every child seconds.
    multiprocessing.set_forkserver_preload(["loopmdm.cli", "loopmdm.training.run", "torch._dynamo", "tests.test_run_safety"])
    root = tmp_path_factory.mktemp("kill")
    ref = root / "reference"
    argv = ["train", "tiny", *[o for o in tiny_overrides(trained) if not o.startswith("train.out_dir")], *SCENARIO]
    trace = _traced([*argv, f"train.out_dir={ref}"])
    return root, argv, ref, trace


def _points_to_kill(trace: list[str], covered: set) -> list[int]:
    """1-based fault points: the first of each kind not in `covered` (or all of them)."""
    picks = []
    for i, label in enumerate(trace):
        if EVERY_POINT or _kind(label) not in covered:
            covered.add(_kind(label))
            picks.append(i + 1)
    return picks


def _check_after_kill(run, argv, ref, capsys, n, label):
    if ckpt.has_checkpoint(run):  # a crash never leaves a run that cannot be evaluated or sampled
        assert load_run(run, device="cpu").step >= 1, (n, label)
    capsys.readouterr()
    _recover(argv, run, capsys)
    assert _records(run) == _records(ref), (n, label)  # bit-identical to the uninterrupted run
    a = ckpt.load_weights(ckpt.checkpoint_path(run), use_ema=False)
    b = ckpt.load_weights(ckpt.checkpoint_path(ref), use_ema=False)
    assert all((a[k] == b[k]).all() for k in a), (n, label)
    assert not [p for p in run.rglob("*") if runfiles.TMP_MARK in p.name], (n, label)


def test_kill_during_every_kind_of_write_of_a_new_run(kill_setup, capsys):
    root, argv, ref, trace = kill_setup
    kinds = {_kind(t) for t in trace}
    assert {f"write {name}: partial" for name in ("config.yaml", "tokenizer.json", "data.json", "latest")} <= kinds
    assert {"write *: complete, not yet renamed", "write *: renamed", "append metrics.jsonl: partial",
            "append metrics.jsonl: done", "checkpoint step-N/*: partial", "checkpoint step-N: complete, not yet renamed",
            "checkpoint step-N: renamed, latest not yet updated", "checkpoint step-N: pruned step-N"} <= kinds
    for n in _points_to_kill(trace, set()):
        run = root / f"new-{n}"
        assert _run_killed([*argv, f"train.out_dir={run}"], n, root / "children.log") == runfiles.FAULT_EXIT
        _check_after_kill(run, [*argv, f"train.out_dir={run}"], ref, capsys, n, trace[n - 1])


@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_kill_during_every_kind_of_write_of_a_resume_or_an_overwrite(kill_setup, capsys, flag):
    """--resume from a base killed after step 3's checkpoint folder was renamed in but before
    `latest` named it: it truncates metrics and re-saves an existing step (the old copy moved
    aside). --overwrite of a finished run: it deletes the old run's files first."""
    root, argv, ref, trace = kill_setup
    base = root / f"base{flag}"
    if flag == "--resume":
        n_base = trace.index("checkpoint step-0000003: renamed, latest not yet updated") + 1
        assert _run_killed([*argv, f"train.out_dir={base}"], n_base, root / "children.log") == runfiles.FAULT_EXIT
    else:
        shutil.copytree(ref, base)
    traced = root / f"traced{flag}"
    shutil.copytree(base, traced)
    flag_trace = _traced([*argv, f"train.out_dir={traced}", flag])
    new_kinds = {_kind(t) for t in flag_trace} - {_kind(t) for t in trace}
    assert new_kinds == ({"write metrics.jsonl: partial", "checkpoint step-N: old copy moved aside"} if flag == "--resume"
                         else {"overwrite: deleted checkpoints/latest", "overwrite: deleted checkpoints/step-N",
                               "overwrite: deleted checkpoints/best.safetensors", "overwrite: deleted run file"})
    for n in _points_to_kill(flag_trace, {_kind(t) for t in trace} if not EVERY_POINT else set()):
        run = root / f"{flag[2:]}-{n}"
        shutil.copytree(base, run)
        cmd = [*argv, f"train.out_dir={run}", flag]
        assert _run_killed(cmd, n, root / "children.log") == runfiles.FAULT_EXIT
        _check_after_kill(run, cmd, ref, capsys, n, flag_trace[n - 1])


# ----------------------------------------------------------------------------- 4. disk full

def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_last_one(trained, tmp_path, capsys, monkeypatch):
    run = copy_run(trained, tmp_path)
    real_write = runfiles.write_all

    def filling_disk(f, data, label):
        if "train_state.pt" in label:
            f.write(data[: len(data) // 3])
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(f, data, label)

    monkeypatch.setattr(ckpt, "write_all", filling_disk)
    code, _, err = run_cli(capsys, *train_argv(trained, run, "train.max_steps=8", "--resume"))
    assert_one_line_error(code, err, "disk full", "ENOSPC", "step-0000006 is kept", "--resume")
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the partial folder does not keep the disk full
    assert ckpt.checkpoint_path(run).name == "step-0000006"
    monkeypatch.undo()
    # A dead writer's leftovers (another pid) are removed by the next writer, which holds the lock.
    (run / "checkpoints" / ".tmp-step-0000099-999999").mkdir()
    (run / "checkpoints" / ".tmp-step-0000099-999999" / "model.safetensors").write_bytes(b"x" * 1000)
    (run / ".config.yaml.tmp-999999").write_text("model: {")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 7, "lo')  # the partial line a full disk leaves
    code, out, err = run_cli(capsys, *train_argv(trained, run, "train.max_steps=8", "--resume"))
    assert code == 0, err
    assert "removed 2 leftover" in err and "partial last line" in err
    assert not [p for p in run.rglob("*") if runfiles.TMP_MARK in p.name]
    assert [r["step"] for r in runfiles.read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"] == list(range(1, 9))


# ----------------------------------------------------------------------------- 5. non-finite

@pytest.mark.parametrize("override,needle", [
    ("train.lr=inf", "train.lr=inf must be a finite number"),
    ("model.rope_base=0", "model.rope_base=0.0 must be > 0"),
    ("model.rope_base=-1", "model.rope_base=-1.0 must be > 0"),
    ("model.mlp_ratio=inf", "model.mlp_ratio=inf must be a finite number"),
    ("train.max_flops=nan", "train.max_flops=nan must be a finite number"),
])
def test_non_finite_settings_are_refused(capsys, override, needle):
    assert_one_line_error(*run_cli(capsys, "train", "tiny", override)[::2], needle)
    assert_one_line_error(*run_cli(capsys, "flops", "tiny", override)[::2], needle)


def test_a_diverging_run_stops_and_keeps_the_last_finite_checkpoint(trained, tmp_path, capsys, monkeypatch):
    import torch

    from loopmdm.training.trainer import Trainer

    run = tmp_path / "run"
    original = Trainer.train_step

    def diverging_step(self):
        out = original(self)
        if self.step == 6:  # after the step-4 checkpoint
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("inf"))
        return out

    monkeypatch.setattr(Trainer, "train_step", diverging_step)
    code, _, err = run_cli(capsys, *train_argv(trained, run, "train.max_steps=12"))
    assert_one_line_error(code, err, "non-finite", "step-0000004 is kept", "lower train.lr")
    assert ckpt.checkpoint_path(run).name == "step-0000004"
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]  # strict JSON
    assert max(r["step"] for r in records) < 7 and "NaN" not in (run / "metrics.jsonl").read_text()


# ----------------------------------------------------------------------------- 6. one line each

def test_damaged_run_files_give_a_line_or_recover(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    (run / "config.yaml").write_text("")  # a kill in the middle of the old in-place write
    code, _, err = run_cli(capsys, *train_argv(trained, run, "train.max_steps=7", "--resume"))
    assert code == 0 and "config.yaml' is empty or not a run config" in err and "stored in checkpoint" in err
    assert "model:" in (run / "config.yaml").read_text()  # rewritten from the checkpoint's copy
    (run / "config.yaml").unlink()
    assert run_cli(capsys, "eval", str(run), "--loops", "1", "--json")[0] == 0
    (run / "data.json").unlink()
    code, _, err = run_cli(capsys, "eval", str(run), "--loops", "1", "--json")
    assert code == 0 and "data.json' is missing" in err
    # A training state that loads but lacks keys is damaged: the previous checkpoint is used.
    import torch

    state_file = ckpt.checkpoint_path(run) / "train_state.pt"
    torch.save({"step": 7}, state_file)
    code, _, err = run_cli(capsys, *train_argv(trained, run, "train.max_steps=8", "--resume"))
    assert code == 0 and "incomplete (lacks tokens" in err and "using step-0000006" in err


def test_a_missing_ema_file_is_said_or_refused(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    (run / "checkpoints" / "step-0000006" / "ema.safetensors").unlink()
    code, out, err = run_cli(capsys, "eval", str(run), "--loops", "1", "--json")
    assert code == 0 and "has no ema.safetensors" in err and json.loads(out)[0]["step"] == 4
    (run / "checkpoints" / "step-0000004" / "ema.safetensors").unlink()
    assert_one_line_error(*run_cli(capsys, "sample", str(run), "--steps", "2")[::2], "ema.safetensors", "--no-ema")
    code, out, _ = run_cli(capsys, "eval", str(run), "--loops", "1", "--json", "--no-ema")
    assert code == 0 and json.loads(out)[0]["step"] == 6


@pytest.mark.parametrize("argv,needles", [
    (["eval", "{run}", "--draws", "-2"], ["--draws -2", ">= 1"]),
    (["eval", "{run}", "--draws", "0"], ["--draws 0"]),
    (["eval", "{run}", "--batch-size", "0"], ["--batch-size 0"]),
    (["eval", "{run}", "--batches", "-1"], ["--batches -1"]),
    (["eval", "{run}", "--data", "{run}"], ["is a run directory, not a prepared data folder"]),
    (["sample", "{run}", "--length", "33"], ["--length 33", "data.seq_len=32"]),
    (["sample", "{run}", "--length", "0"], ["--length 0"]),
    (["flops", "tiny", "model.mlp_ratio=inf"], ["model.mlp_ratio=inf"]),
])
def test_bad_options_give_one_line(trained, capsys, argv, needles):
    argv = [a.replace("{run}", str(trained / "run")) for a in argv]
    assert_one_line_error(*run_cli(capsys, *argv)[::2], *needles)


def test_config_files_that_are_empty_or_a_list_are_refused(tmp_path, capsys):
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "list.yaml").write_text("- model\n- train\n")
    assert_one_line_error(*run_cli(capsys, "flops", str(tmp_path / "empty.yaml"))[::2], "is empty")
    assert_one_line_error(*run_cli(capsys, "train", str(tmp_path / "list.yaml"))[::2], "not a list")


def test_metrics_with_a_damaged_middle_line_name_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(LoopMDMError, match="line 2"):
        runfiles.read_jsonl(path)


# ----------------------------------------------------------------------------- 7. eval on any text

def test_eval_scores_all_of_a_single_text_file_with_the_runs_tokenizer(trained, tmp_path, capsys):
    text = "The film won three awards at the festival on Sunday night. " * 7
    (tmp_path / "one.txt").write_text(text)
    code, out, _ = run_cli(capsys, "eval", str(trained / "run"), "--text", str(tmp_path / "one.txt"),
                           "--loops", "1,3", "--json")
    assert code == 0
    records = json.loads(out)
    run = load_run(trained / "run", device="cpu")
    n_tokens = len(run.tokenizer.encode(text.strip())) + 1  # + EOS; the partial last block is scored too
    assert [r["loops"] for r in records] == [1, 3] and all(r["tokens"] == n_tokens for r in records)
    assert records[0]["split"] == "text" and records[0]["unigram_xent"] > 0
    assert_one_line_error(*run_cli(capsys, "eval", str(trained / "run"), "--text", str(tmp_path / "no*.txt"))[::2],
                          "--text pattern")


def test_eval_refuses_data_prepared_with_another_length(trained, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("Shares in the company rose after strong results were announced. " * 30)
    (tmp_path / "b.txt").write_text("The film won three awards at the festival on Sunday night. " * 30)
    code, out, _ = run_cli(capsys, "prepare", "tiny", "data.source=text", f"data.paths=['{tmp_path}/*.txt']",
                           "data.seq_len=16", "data.val_fraction=0.5", f"data.cache_dir={tmp_path / 'cache'}",
                           f"data.tokenizer_path={trained / 'run' / 'tokenizer.json'}")
    assert code == 0
    assert_one_line_error(*run_cli(capsys, "eval", str(trained / "run"), "--data", json.loads(out)["path"])[::2],
                          "seq_len=16", "data.seq_len=32")


# ----------------------------------------------------------------------------- 8. progress

def test_long_evaluations_show_progress(monkeypatch):
    import numpy as np
    import torch

    from loopmdm.diffusion.schedule import make_schedule
    from loopmdm.evaluation import nelbo

    bars = []

    class Bar:
        def __init__(self, **kwargs):
            self.kwargs, self.n = kwargs, 0
            bars.append(self)

        def update(self, n):
            self.n += n

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            pass

    def model(x, num_loops=1, t=None, key_mask=None):
        return torch.zeros(*x.shape, 10)

    model.training, model.eval, model.train, model.mask_id = False, lambda: None, lambda mode: None, 10
    monkeypatch.setattr(nelbo, "tqdm", Bar)
    blocks = np.random.default_rng(0).integers(0, 10, size=(20, 8))
    nelbo.evaluate_nelbo(model, blocks, make_schedule("loglinear"), [1, 2], eps=1e-3, batch_size=8, progress=True)
    assert bars[0].kwargs["total"] == 2 * 3 and bars[0].n == 6 and bars[0].kwargs["file"] is sys.stderr
    assert not bars[0].kwargs["disable"] and 0 < bars[0].kwargs["delay"] <= 3
