"""Nothing lost, nothing silent (issue 20): --overwrite replaces only what this project wrote,
user-named outputs are never clobbered or left half-written, what cannot be scored is refused,
and every failure is one line."""

import json
import shutil

import pytest

from loopmdm import runfiles
from loopmdm.cli import main
from loopmdm.training import checkpoint as ckpt
from tests.conftest import tiny_overrides
from tests.test_cli import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    assert main(["train", "tiny", *tiny_overrides(root), "train.max_steps=6", "train.eval_every=0"]) == 0
    return root


def copy_run(trained, tmp_path, name="run"):
    run = tmp_path / name
    shutil.copytree(trained / "run", run)
    return run


def train_argv(trained, run, *extra):
    overrides = [o for o in tiny_overrides(trained) if not o.startswith("train.out_dir")]
    return ["train", "tiny", *overrides, "train.max_steps=2", "train.eval_every=0", f"train.out_dir={run}", *extra]


def snapshot(folder):
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


# ----------------------------------------------------------------------------- 1. --overwrite

def test_a_run_carries_a_marker_with_its_id(trained):
    marker = runfiles.read_marker(trained / "run")
    assert marker is not None and marker["kind"] == "loopmdm run" and len(marker["run_id"]) == 32


def test_an_empty_lock_does_not_make_a_users_folder_a_run(trained, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / ".lock").write_bytes(b"")
    (mine / "config.yaml").write_text("model: {}\ndata: {}\ntrain: {}\n")
    (mine / "tokenizer.json").write_text('{"mine": true}')
    before = snapshot(mine)
    for flags in ([], ["--overwrite"]):
        code, _, err = run_cli(capsys, *train_argv(trained, mine, *flags))
        assert_one_line_error(code, err, "not a loopmdm run directory", "config.yaml")
    assert snapshot(mine) == before


def test_another_tools_run_folder_is_never_deleted(trained, tmp_path, capsys):
    other = tmp_path / "other"
    (other / "checkpoints" / "step-100").mkdir(parents=True)
    (other / "checkpoints" / "step-100" / "weights.bin").write_bytes(b"\x01\x02")
    (other / "config.yaml").write_text("model: {d: 1}\ndata: {x: 2}\ntrain: {lr: 3}\n")
    (other / "metrics.jsonl").write_text('{"step": 100}\n')
    before = snapshot(other)
    code, _, err = run_cli(capsys, *train_argv(trained, other, "--overwrite"))
    assert_one_line_error(code, err, "no .loopmdm-run marker", "will not replace it")
    code, _, err = run_cli(capsys, *train_argv(trained, other, "--resume"))  # not ours: does not load
    assert code == 2 and "Traceback" not in err
    assert snapshot(other) == before  # not even a lock file is left behind


def test_overwrite_keeps_a_users_backup_inside_the_run(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    backup = run / "checkpoints" / "step-0000004.bak"
    shutil.copytree(run / "checkpoints" / "step-0000004", backup)
    (run / "checkpoints" / "notes.txt").write_text("keep me")
    old_id = runfiles.read_marker(run)["run_id"]
    assert run_cli(capsys, *train_argv(trained, run, "--overwrite"))[0] == 0
    assert backup.is_dir() and (run / "checkpoints" / "notes.txt").read_text() == "keep me"
    assert [p.name for p in ckpt.step_folders(run)] == ["step-0000002"]
    assert runfiles.read_marker(run)["run_id"] != old_id  # a new run, a new identity


def test_a_run_without_the_marker_is_resumed_and_marked_but_not_overwritten(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    (run / runfiles.MARKER_FILE).unlink()  # a run written before the marker existed
    before = snapshot(run)
    code, _, err = run_cli(capsys, *train_argv(trained, run, "--overwrite"))
    assert_one_line_error(code, err, "no .loopmdm-run marker", "--resume")
    code, _, err = run_cli(capsys, *train_argv(trained, run))
    assert_one_line_error(code, err, "no .loopmdm-run marker")
    assert snapshot(run) == before
    assert run_cli(capsys, *train_argv(trained, run, "train.max_steps=7", "--resume"))[0] == 0
    assert runfiles.read_marker(run) is not None
    assert run_cli(capsys, *train_argv(trained, run, "--overwrite"))[0] == 0


def test_the_losing_second_writer_is_told_the_run_is_in_use(trained, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    runfiles.write_marker(run)
    (run / "config.yaml").write_text("model: {}\n")  # the first writer is still preparing its data
    with runfiles.RunLock(run):
        code, _, err = run_cli(capsys, *train_argv(trained, run))
    assert_one_line_error(code, err, "in use by another loopmdm process", f"pid ")
    assert "--overwrite" not in err
