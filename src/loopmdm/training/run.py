"""Run directories, training side: create (or reopen) one and train into it.
Reopening a run for evaluation and sampling is loopmdm/runs.py.

RUN/config.yaml       the resolved config (model.vocab_size filled in from the data)
RUN/data.json         where the prepared data lives and the tokenizer's fingerprint
RUN/tokenizer.json    a copy of the tokenizer, so sampling needs nothing else
RUN/metrics.jsonl     one JSON record per log / validation step
RUN/checkpoints/      see checkpoint.py
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from loopmdm.config import Config, config_from_dict
from loopmdm.data.prepare import NOT_IN_KEY, prepare_data
from loopmdm.data.prepared import PreparedData
from loopmdm.errors import LoopMDMError, require
from loopmdm.runfiles import (LOCK_FILE, MARKER_FILE, RunLock, clean_stale, disk_error, fault_point, in_use_error,
                               is_checkpoint_entry, is_our_lock, is_tmp_of, lock_holder, note, read_marker,
                               write_if_changed, write_marker)
from loopmdm.runs import read_run_config, recorded_data_path
from loopmdm import checkpoint as ckpt
from loopmdm.training.distributed import DistContext
from loopmdm.training.trainer import Trainer


def _first_difference(a, b, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            diff = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if diff:
                return diff
        return None
    return None if a == b else f"{prefix[:-1]}: saved {a!r}, requested {b!r}"


def attach_vocab(cfg: Config, data: PreparedData) -> None:
    """model.vocab_size comes from the tokenizer; an explicit value must agree with it."""
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = data.vocab_size
    require(cfg.model.vocab_size == data.vocab_size,
            f"model.vocab_size={cfg.model.vocab_size} does not match the data's tokenizer "
            f"({data.meta.get('tokenizer')}, {data.vocab_size} tokens); leave model.vocab_size=0 to take it from the data")


RUN_FILES = ("config.yaml", "data.json", "tokenizer.json", "metrics.jsonl")
OWN_FILES = RUN_FILES + (MARKER_FILE,)  # every file loopmdm writes at the top of a run directory


def classify_run_dir(run_dir: Path) -> tuple[str, list[str]]:
    """('missing' | 'empty' | 'run' | 'unmarked' | 'foreign', names loopmdm did not write).

    'run' is a folder holding our marker (RUN/.loopmdm-run), nothing else: file names alone
    (config.yaml, metrics.jsonl, checkpoints/step-N) could be another tool's. 'empty' allows our
    lock and temporary files. 'unmarked' holds checkpoints but no marker: a run written before
    the marker existed, or another tool's folder; only --resume opens it (its checkpoint must
    load as ours), which then marks it."""
    if not run_dir.exists():
        return "missing", []
    require(run_dir.is_dir(), f"train.out_dir='{run_dir}' is a file, not a folder; set train.out_dir to a folder")
    try:
        names = sorted(os.listdir(run_dir))
    except OSError as exc:
        raise LoopMDMError(f"cannot read train.out_dir='{run_dir}': {exc.strerror or exc}") from None
    marked = read_marker(run_dir) is not None
    ours = set(OWN_FILES) | {"checkpoints"} if marked else set()
    foreign = [n for n in names if not (is_tmp_of(n, OWN_FILES) or (n == LOCK_FILE and is_our_lock(run_dir / n))
                                        or n in ours)]
    if marked:
        return "run", foreign
    if not foreign:
        return "empty", []
    if ckpt.has_checkpoint(run_dir):
        return "unmarked", foreign
    return "foreign", foreign


def delete_run_files(run_dir: Path) -> None:
    """--overwrite: remove what loopmdm wrote in `run_dir`: its run files, `checkpoints/latest`,
    `checkpoints/step-N` and their temporaries. Never other files (a user's
    `checkpoints/step-0000004.bak` stays), never the lock or the marker (rewritten next)."""
    root = run_dir / "checkpoints"
    if root.is_dir():
        for path in sorted(root.iterdir()):
            if is_checkpoint_entry(path.name) or path.name == ckpt.BEST_FILE:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
                fault_point(f"overwrite: deleted checkpoints/{path.name}")
        if not any(root.iterdir()):
            root.rmdir()
    for name in sorted(os.listdir(run_dir)):
        if (name in RUN_FILES and not (run_dir / name).is_dir()) or is_tmp_of(name, OWN_FILES):
            (run_dir / name).unlink()
            fault_point(f"overwrite: deleted {name}")


def _write_run_files(cfg: Config, data: PreparedData, run_dir: Path, new_run: bool) -> None:
    info = {"prepared_path": str(data.path.resolve()), "tokenizer_fingerprint": data.tokenizer.fingerprint(),
            "vocab_size": data.vocab_size}
    try:
        if new_run or read_marker(run_dir) is None:  # the marker comes first: what --overwrite recognises
            write_marker(run_dir)
        write_if_changed(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        write_if_changed(run_dir / "tokenizer.json", data.tokenizer.tok.to_str(pretty=True))
        write_if_changed(run_dir / "data.json", json.dumps(info, indent=2) + "\n")
    except OSError as exc:
        raise disk_error(exc, f"the run files in '{run_dir}'") from None


def train(cfg: Config, resume: bool = False, overwrite: bool = False, dist: DistContext | None = None,
          progress_print=print) -> dict:
    """Check the inputs, take the run directory's lock, (re)open it, train, return the summary.

    Nothing is written or deleted before the data, the config and (for --resume) the checkpoint
    have been checked; --overwrite only ever replaces a loopmdm run, and only its own files."""
    dist = dist or DistContext()
    require(not (resume and overwrite), "pass --resume or --overwrite, not both")
    run_dir = Path(cfg.train.out_dir)
    kind, foreign = classify_run_dir(run_dir)
    if kind in ("run", "unmarked", "empty"):
        holder = lock_holder(run_dir)  # a live writer: say so, not what its half-made folder looks like
        if holder:
            raise in_use_error(run_dir, holder)
    has_ckpt = kind in ("run", "unmarked") and ckpt.has_checkpoint(run_dir)
    if resume:
        require(has_ckpt, f"--resume: no checkpoint in '{run_dir}' to resume from"
                + ("; the run stopped before its first checkpoint: start it again with --overwrite" if kind == "run" else ""))
    elif kind == "unmarked":
        raise LoopMDMError(f"train.out_dir='{run_dir}' holds checkpoints but no {MARKER_FILE} marker (a run from an "
                           f"older loopmdm, or another tool's folder), so {'--overwrite' if overwrite else 'loopmdm'} "
                           f"will not replace it: continue it with --resume (which marks it), delete it yourself, "
                           f"or set train.out_dir to a new folder")
    elif kind == "run" and has_ckpt and not overwrite:
        raise LoopMDMError(f"run directory '{run_dir}' already holds a checkpoint; pass --resume to continue it, "
                           f"--overwrite to replace it, or set train.out_dir to a new folder")
    elif kind == "run" and not overwrite:
        raise LoopMDMError(f"run directory '{run_dir}' is not empty: it holds a run that saved no checkpoint; "
                           f"pass --overwrite to replace it or set train.out_dir to a new folder")
    elif kind == "foreign":
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise LoopMDMError(f"train.out_dir='{run_dir}' is not empty and is not a loopmdm run directory (it holds "
                           f"{shown}); {'--overwrite only replaces run directories; ' if overwrite else ''}"
                           f"set train.out_dir to a new or empty folder")
    dist.barrier()  # every rank has looked before the main rank creates anything
    lock = None
    had_lock = (run_dir / LOCK_FILE).exists()
    created = [d for d in [run_dir, *run_dir.parents] if not d.exists()]  # innermost first
    if dist.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LoopMDMError(f"cannot create the run directory train.out_dir='{run_dir}': {exc.strerror or exc}") from None
        lock = RunLock(run_dir).acquire()
    try:
        return _train_locked(cfg, run_dir, resume, overwrite and kind == "run", kind in ("missing", "empty"), dist,
                             progress_print)
    finally:
        if lock is not None:
            lock.release()
            if kind == "missing" and os.listdir(run_dir) == [LOCK_FILE]:  # failed before writing anything
                (run_dir / LOCK_FILE).unlink(missing_ok=True)
                try:  # and the folders above it that this call made
                    for folder in created:
                        folder.rmdir()
                except OSError:
                    pass
            elif not had_lock and read_marker(run_dir) is None:  # not made a run: leave the folder as it was
                (run_dir / LOCK_FILE).unlink(missing_ok=True)


def _train_locked(cfg: Config, run_dir: Path, resume: bool, replace: bool, new_run: bool, dist: DistContext,
                  progress_print) -> dict:
    if dist.is_main:
        removed = clean_stale(run_dir, OWN_FILES)  # we hold the lock: whoever left these is dead
        if removed:
            note(f"removed {len(removed)} leftover(s) of an interrupted write in '{run_dir}': {', '.join(removed[:3])}")
    # Every rank calls it: the first takes the cache folder's file lock and prepares, the others
    # block on that lock (no timeout) and then read the result -- a collective barrier here
    # would kill the job after LOOPMDM_DIST_TIMEOUT while a paper-size corpus is tokenized.
    # A resumed run first looks where it recorded its data (an older run's ./data_cache).
    known = recorded_data_path(run_dir) if resume else None
    data = prepare_data(cfg.data, progress=dist.is_main, known=known)
    attach_vocab(cfg, data)
    if resume:
        raw = json.loads(json.dumps(read_run_config(run_dir, say=note if dist.is_main else (lambda _m: None))))
        saved = config_from_dict(raw).to_dict()  # an older run's config, read as it was trained
        for section in ("model", "diffusion", "data"):
            for key, value in saved[section].items():
                if key not in (raw.get(section) or {}):  # an option added after this run was saved
                    setattr(getattr(cfg, section), key, value)
            same = NOT_IN_KEY if section == "data" else ()  # where and how fast it is prepared: free to change
            if section == "data" and "task" not in (saved["data"]["source"], cfg.data.source):
                # task settings are unread by other sources and outside their key (data/prepare.py), so
                # a changed default of one (data.task_hops) must not block resuming a text run
                same = same + tuple(k for k in saved["data"] if k.startswith("task"))
            diff = _first_difference({k: v for k, v in saved[section].items() if k not in same},
                                     {k: v for k, v in cfg.to_dict()[section].items() if k not in same}, f"{section}.")
            require(diff is None, f"--resume with a different setting ({diff}); only train.* may change")
    trainer = Trainer(cfg, data, run_dir, dist)
    if resume:
        trainer.resume()  # loads (or falls back); the first write is the metrics truncation
    elif cfg.train.init_from:
        trainer.init_from_run(cfg.train.init_from)  # every rank loads the same weights
    if dist.is_main:
        if replace:
            delete_run_files(run_dir)
        _write_run_files(cfg, data, run_dir, new_run or replace)
        progress_print(f"run directory: {run_dir}")
    dist.barrier()
    if resume and dist.is_main:
        progress_print(f"resumed from step {trainer.step}")
    return trainer.train()
