"""Nothing lost, nothing silent (issue 20): --overwrite replaces only what this project wrote,
user-named outputs are never clobbered or left half-written, what cannot be scored is refused,
and every failure is one line."""

import json
import shutil

import pytest

from loopmdm import runfiles
from loopmdm.cli import main
from loopmdm import checkpoint as ckpt
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


# ----------------------------------------------------------------------------- user-named outputs

def test_pairs_never_overwrites_a_users_file_unless_told(tmp_path, capsys):
    mine = tmp_path / "mine.jsonl"
    mine.write_text("my own pairs\n")
    code, _, err = run_cli(capsys, "pairs", "sudoku:4", "--num", "3", "--out", str(mine))
    assert_one_line_error(code, err, "already exists", "--overwrite")
    assert mine.read_text() == "my own pairs\n"
    assert run_cli(capsys, "pairs", "sudoku:4", "--num", "3", "--out", str(mine), "--overwrite")[0] == 0
    assert len(mine.read_text().splitlines()) == 3 and not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("out,needle", [("", "is empty"), ("{dir}", "is a folder"),
                                        ("{file}/x.jsonl", "is a file, not a folder")])
def test_pairs_out_that_cannot_be_a_file_is_one_line(tmp_path, capsys, out, needle):
    (tmp_path / "f").write_text("x")
    out = out.replace("{dir}", str(tmp_path)).replace("{file}", str(tmp_path / "f"))
    assert_one_line_error(*run_cli(capsys, "pairs", "sudoku:4", "--num", "3", "--out", out)[::2], needle)


def _disk_full(monkeypatch, after_bytes=0):
    """Every write through runfiles.write_all fails with ENOSPC (a full file system)."""
    import errno

    def full(f, data, label):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runfiles, "write_all", full)


def test_a_full_disk_under_pairs_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    _disk_full(monkeypatch)
    code, _, err = run_cli(capsys, "pairs", "sudoku:4", "--num", "3", "--out", str(tmp_path / "p.jsonl"))
    assert_one_line_error(code, err, "disk full", "p.jsonl")
    assert list(tmp_path.iterdir()) == []  # no temporary, no 0-byte file


def test_a_full_disk_under_analyze_plots_is_one_line_and_leaves_nothing(trained, tmp_path, capsys, monkeypatch):
    _disk_full(monkeypatch)
    plots = tmp_path / "plots"
    code, _, err = run_cli(capsys, "analyze", str(trained / "run"), "--batches", "1", "--loops", "2",
                           "--plots", str(plots))
    assert_one_line_error(code, err, "disk full", "plots")
    assert [p for p in plots.rglob("*") if p.is_file()] == []


def test_analyze_plots_into_a_file_is_refused_before_work(trained, tmp_path, capsys):
    (tmp_path / "f.png").write_bytes(b"png")
    code, _, err = run_cli(capsys, "analyze", str(trained / "run"), "--plots", str(tmp_path / "f.png"))
    assert_one_line_error(code, err, "--plots", "is a file")


def test_zeroshot_out_is_refused_when_it_exists(trained, tmp_path, capsys):
    (tmp_path / "zs.md").write_text("my notes")
    code, _, err = run_cli(capsys, "zeroshot", str(trained / "run"), "--out", str(tmp_path / "zs"))
    assert_one_line_error(code, err, "zs.md", "already exists", "--overwrite")
    assert (tmp_path / "zs.md").read_text() == "my notes"


def test_sample_bench_bad_taus_and_a_file_as_out_are_one_line(trained, tmp_path, capsys):
    assert_one_line_error(*run_cli(capsys, "sample-bench", str(trained / "run"), "--taus", "abc")[::2], "--taus 'abc'")
    (tmp_path / "f").write_text("x")
    assert_one_line_error(*run_cli(capsys, "sample-bench", str(trained / "run"), "--out", str(tmp_path / "f"))[::2],
                          "is a file")


# ----------------------------------------------------------------------------- 2. what cannot be scored

@pytest.fixture(scope="module")
def task_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    overrides = [o for o in tiny_overrides(root) if not o.startswith("data.")]
    # 4 nodes, 1 hop: sequences of 6 tokens, shorter than the 8 that text data needs at least.
    assert main(["train", "tiny", *overrides, "data.source=task", "data.task=khop", "data.task_size=4",
                 "data.task_hops=1", "data.task_examples=300", f"data.cache_dir={root / 'cache'}",
                 "train.max_steps=2", "train.eval_every=0"]) == 0
    return root / "run"


def test_text_scores_of_a_task_run_are_refused(task_run, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("Some plain English text. " * 20)
    assert_one_line_error(*run_cli(capsys, "eval", str(task_run), "--text", str(text))[::2],
                          "data.source=task", "cannot score text")
    assert_one_line_error(*run_cli(capsys, "zeroshot", str(task_run), "--sets", f"ptb={text}")[::2],
                          "data.source=task", "cannot score text")


@pytest.mark.parametrize("content,needle", [(bytes(range(256)) * 40, "not text"), (b"caf\xe9 " * 50, "not UTF-8")])
def test_input_that_is_not_text_is_refused(trained, tmp_path, capsys, content, needle):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    assert_one_line_error(*run_cli(capsys, "eval", str(trained / "run"), "--text", str(bad))[::2], needle, "bad.txt")
    assert_one_line_error(*run_cli(capsys, "zeroshot", str(trained / "run"), "--sets", f"ptb={bad}")[::2],
                          needle, "bad.txt")
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(content)
    assert_one_line_error(*run_cli(capsys, "finetune", str(jsonl), "--init", str(trained / "run"))[::2],
                          needle, "bad.jsonl")
    assert_one_line_error(*run_cli(capsys, "pairs", f"gsm8k-aug:{bad}", "--out", str(tmp_path / "p.jsonl"))[::2],
                          needle, "bad.txt")
    assert not (tmp_path / "p.jsonl").exists()


# ----------------------------------------------------------------------------- 3. one line, never a traceback

@pytest.mark.parametrize("preset", ["configs/experiments/khop.yaml", "configs/experiments/sudoku.yaml"])
def test_flops_of_a_task_config(capsys, preset):
    code, out, _ = run_cli(capsys, "flops", preset, "--json")
    assert code == 0 and json.loads(out)["vocab_size"] > 0


def test_an_optimizer_overflow_stops_like_a_divergence(trained, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_argv(trained, run, "train.lr=1e38", "train.warmup_steps=0"))
    assert_one_line_error(code, err, "training diverged", "overflow", "no checkpoint was saved", "--overwrite")
    assert not ckpt.has_checkpoint(run)


def test_an_os_error_anywhere_is_one_line_naming_the_path(capsys, monkeypatch):
    import errno

    import loopmdm.cli as cli

    def boom(args):
        raise IsADirectoryError(errno.EISDIR, "Is a directory", "/some/where")

    import dataclasses

    monkeypatch.setitem(cli.COMMANDS, "flops", dataclasses.replace(cli.COMMANDS["flops"], run=boom))
    code, _, err = run_cli(capsys, "flops", "tiny")
    assert_one_line_error(code, err, "'/some/where'", "Is a directory")


def test_syntax_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval", "run", "--draws", "abc"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.strip().splitlines() == [
        "error: argument --draws: invalid int value: 'abc' (see `loopmdm eval --help`)"]


# ----------------------------------------------------------------------------- 4. misleading lines

def test_a_task_run_shorter_than_8_tokens_reopens(task_run, capsys):
    assert json.loads((task_run / "config.yaml").read_text().split("seq_len: ")[1].split()[0]) == 6
    code, out, err = run_cli(capsys, "eval", str(task_run), "--loops", "1", "--json")
    assert code == 0 and json.loads(out)[0]["tokens"] > 0, err
    code, out, err = run_cli(capsys, "solve", str(task_run), "--loops", "1", "--num", "4", "--json")
    assert code == 0 and json.loads(out)[0]["n"] == 4, err
    assert run_cli(capsys, "sample", str(task_run), "--num", "1", "--steps", "4")[0] == 0


def test_finetuning_a_task_run_on_pairs_names_the_mismatch(task_run, user_cache, capsys):
    pairs_dir = user_cache / "pairs"
    before = sorted(pairs_dir.iterdir()) if pairs_dir.is_dir() else []
    code, _, err = run_cli(capsys, "finetune", "sudoku:4", "--init", str(task_run), "--num", "20")
    # Not "data.tokenizer='task' is not allowed; choose one of: ..., task", nor data.seq_len=6.
    assert_one_line_error(code, err, "data.source=task", "khop", "sudoku:4", "trained on text")
    assert "not allowed" not in err and "seq_len=6" not in err
    assert (sorted(pairs_dir.iterdir()) if pairs_dir.is_dir() else []) == before  # refused before any work


def test_a_pairs_config_with_the_task_tokenizer_is_one_line(tmp_path):
    from loopmdm.config import load_config
    from loopmdm.errors import LoopMDMError

    pairs = tmp_path / "p.jsonl"
    pairs.write_text('{"prompt": "a", "answer": "b"}\n')
    with pytest.raises(LoopMDMError, match="data.tokenizer=task is the vocabulary of a synthetic task.*bpe, char, "
                                           "gpt2, bert-base-uncased$"):
        load_config(None, ["data.source=pairs", f"data.paths=['{pairs}']", "data.tokenizer=task"])


def test_latest_as_a_folder_is_named_not_a_full_disk(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    latest = run / "checkpoints" / "latest"
    kept = latest.read_text().strip()
    latest.unlink()
    latest.mkdir()
    code, _, err = run_cli(capsys, *train_argv(trained, run, "train.max_steps=8", "train.checkpoint_every=2", "--resume"))
    assert_one_line_error(code, err, f"'{latest}' is a folder", "move it away", f"{kept} is kept", "--resume")
    assert "free some space" not in err and "no earlier checkpoint" not in err
    assert "is a folder" in err.split("error:")[0]  # the fallback note says so too, not "not readable text"


def test_a_failed_report_only_experiment_leaves_no_out_folder(tmp_path, capsys):
    out = tmp_path / "exp" / "khop"
    assert_one_line_error(*run_cli(capsys, "experiment", "khop", "--report-only", "--out", str(out))[::2],
                          "nothing to report")
    assert not (tmp_path / "exp").exists()


# ----------------------------------------------------------------------------- 5. the data cache

def test_the_default_data_cache_is_the_users_not_the_working_directorys(monkeypatch, tmp_path):
    from loopmdm.config import CACHE_ENV, DataConfig

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert DataConfig().cache_root() == tmp_path / "mine"
    assert DataConfig(cache_dir=str(tmp_path / "explicit")).cache_root() == tmp_path / "explicit"  # a setting wins
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert DataConfig().cache_root() == tmp_path / "xdg" / "loopmdm"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/xdg")  # not absolute: ignored, as the XDG spec says
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert DataConfig().cache_root() == tmp_path / "home" / ".cache" / "loopmdm"


def test_the_test_suite_never_writes_the_real_user_cache(user_cache, tmp_path_factory):
    from loopmdm.config import DataConfig

    assert DataConfig().cache_root() == user_cache
    assert tmp_path_factory.getbasetemp() in user_cache.parents


def _without_cache_dir(root):
    return [o for o in tiny_overrides(root) if not o.startswith("data.cache_dir")]


def test_prepare_from_two_folders_shares_one_cache(tmp_path, monkeypatch, capsys, user_cache):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        code, out, err = run_cli(capsys, "prepare", "tiny", *_without_cache_dir(tmp_path), "data.seq_len=24")
        assert code == 0, err
        assert not (tmp_path / folder / "data_cache").exists()
    assert "using cached" in err  # the second folder found the first one's data
    assert str(user_cache) in out


def test_an_older_run_in_data_cache_resumes_and_reopens_from_anywhere(tmp_path, monkeypatch, capsys, user_cache):
    """A run made when ./data_cache was the default: its config says cache_dir: data_cache, its
    data.json names the folder there. From another folder it resumes and evaluates on that data."""
    from loopmdm.config import config_from_dict
    from loopmdm.runs import recorded_data_path

    (tmp_path / "then").mkdir()
    monkeypatch.chdir(tmp_path / "then")
    overrides = _without_cache_dir(tmp_path) + ["data.seq_len=20", "train.eval_every=0"]
    assert main(["train", "tiny", *overrides, "data.cache_dir=data_cache", "train.max_steps=2"]) == 0
    run = tmp_path / "run"
    recorded = recorded_data_path(run)
    assert recorded.parent == tmp_path / "then" / "data_cache"
    assert "cache_dir: data_cache" in (run / "config.yaml").read_text()
    (tmp_path / "now").mkdir()
    monkeypatch.chdir(tmp_path / "now")
    before = sorted(user_cache.iterdir())
    assert main(["train", "tiny", *overrides, "train.max_steps=4", "--resume"]) == 0
    assert main(["eval", str(run), "--loops", "1"]) == 0
    assert recorded_data_path(run) == recorded  # the same prepared data, not a copy
    assert sorted(user_cache.iterdir()) == before and not (tmp_path / "now" / "data_cache").exists()
    saved = config_from_dict({"data": {"cache_dir": "data_cache"}})
    assert saved.data.cache_root() == user_cache  # what the old default means today
    capsys.readouterr()


# ----------------------------------------------------------------------------- 6. leftovers of preparers

def _pairs_cfg(tmp_path, lines):
    from loopmdm.config import DataConfig

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(lines) + "\n")
    return DataConfig(source="pairs", paths=[str(pairs)], tokenizer="char", seq_len=16, val_fraction=0.3,
                      cache_dir=str(tmp_path / "cache"))


def test_a_failed_pairs_preparation_leaves_no_partial_folder_nor_lock(tmp_path):
    from loopmdm.data.prepare import prepare_data
    from loopmdm.errors import LoopMDMError

    good = [json.dumps({"prompt": f"{i}+1", "answer": str(i + 1)}) for i in range(6)]
    cfg = _pairs_cfg(tmp_path, good[:3] + ["{not json"] + good[3:])
    with pytest.raises(LoopMDMError, match="pairs.jsonl:4 is not valid JSON"):
        prepare_data(cfg)
    cache = tmp_path / "cache"
    assert not cache.exists() or sorted(p.name for p in cache.iterdir()) == []


def test_what_dead_preparers_left_is_removed_and_live_ones_are_kept(tmp_path):
    """A preparer killed outright (SIGKILL, OOM) runs no cleanup: its `.partial-NAME/` and
    `.NAME.lock` stay. The next preparer removes them when no live process holds the lock,
    keeps a partial folder a rerun can resume, and never touches a live preparer's."""
    import fcntl

    from loopmdm.data.prepare import prepare_data

    cache = tmp_path / "cache"
    cache.mkdir()
    dead, live, resumable = "pairs-char-aaaaaaaaaaaa", "pairs-char-bbbbbbbbbbbb", "text-bpe-cccccccccccc"
    for name in (dead, live, resumable):
        (cache / f".partial-{name}").mkdir()
        (cache / f".partial-{name}" / "train.bin").write_bytes(b"\0" * 64)
        (cache / f".{name}.lock").write_bytes(b"")
    (cache / f".partial-{resumable}" / "progress.json").write_text('{"writers": {}}')
    holder = open(cache / f".{live}.lock", "a")  # another process's lock, as flock sees it
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        data = prepare_data(_pairs_cfg(tmp_path, [json.dumps({"prompt": f"{i}+1", "answer": str(i + 1)})
                                                  for i in range(6)]))
    finally:
        holder.close()
    left = sorted(p.name for p in cache.iterdir())
    assert left == sorted([data.path.name, f".partial-{live}", f".{live}.lock", f".partial-{resumable}"])
