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
from loopmdm.runfiles import (LOCK_FILE, TMP_MARK, RunLock, clean_stale, disk_error, fault_point, is_our_lock, note,
                               write_if_changed)
from loopmdm.runs import read_run_config
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


def _leftover(name: str) -> bool:
    """A temporary file of one of our run files (`.config.yaml.tmp-PID`)."""
    return name.startswith(".") and TMP_MARK in name and name[1:].split(TMP_MARK)[0] in RUN_FILES


def _looks_like_run_config(path: Path) -> bool:
    try:
        saved = OmegaConf.to_container(OmegaConf.load(path))
    except Exception:
        return False
    return isinstance(saved, dict) and all(isinstance(saved.get(k), dict) for k in ("model", "data", "train"))


def classify_run_dir(run_dir: Path) -> tuple[str, list[str]]:
    """('missing' | 'empty' | 'run' | 'foreign', names loopmdm did not write). 'empty' allows
    our own lock and temporary files; 'run' needs a checkpoint, our lock or a run config."""
    if not run_dir.exists():
        return "missing", []
    require(run_dir.is_dir(), f"train.out_dir='{run_dir}' is a file, not a folder; set train.out_dir to a folder")
    try:
        names = sorted(os.listdir(run_dir))
    except OSError as exc:
        raise LoopMDMError(f"cannot read train.out_dir='{run_dir}': {exc.strerror or exc}") from None
    ours = set(RUN_FILES) | {"checkpoints"}
    is_run = (ckpt.has_checkpoint(run_dir) or (LOCK_FILE in names and is_our_lock(run_dir / LOCK_FILE))
              or _looks_like_run_config(run_dir / "config.yaml"))
    foreign = [n for n in names if not (_leftover(n) or (n == LOCK_FILE and is_our_lock(run_dir / n))
                                        or (is_run and n in ours))]
    if is_run:
        return "run", foreign
    if not foreign:
        return "empty", []
    return "foreign", foreign


def delete_run_files(run_dir: Path) -> None:
    """--overwrite: remove what loopmdm wrote in `run_dir` (never other files, never the lock)."""
    root = run_dir / "checkpoints"
    if root.is_dir():
        for path in sorted(root.iterdir()):
            if path.name in (ckpt.LATEST, ckpt.BEST_FILE) or path.name.startswith((".", "step-")):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                fault_point(f"overwrite: deleted checkpoints/{path.name}")
        if not any(root.iterdir()):
            root.rmdir()
    for name in sorted(os.listdir(run_dir)):
        if name in RUN_FILES or _leftover(name):
            (run_dir / name).unlink()
            fault_point(f"overwrite: deleted {name}")


def _write_run_files(cfg: Config, data: PreparedData, run_dir: Path) -> None:
    info = {"prepared_path": str(data.path.resolve()), "tokenizer_fingerprint": data.tokenizer.fingerprint(),
            "vocab_size": data.vocab_size}
    try:
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
    has_ckpt = kind == "run" and ckpt.has_checkpoint(run_dir)
    if resume:
        require(has_ckpt, f"--resume: no checkpoint in '{run_dir}' to resume from"
                + ("; the run stopped before its first checkpoint: start it again with --overwrite" if kind == "run" else ""))
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
    if dist.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LoopMDMError(f"cannot create the run directory train.out_dir='{run_dir}': {exc.strerror or exc}") from None
        lock = RunLock(run_dir).acquire()
    try:
        return _train_locked(cfg, run_dir, resume, overwrite and kind == "run", dist, progress_print)
    finally:
        if lock is not None:
            lock.release()
            if kind == "missing" and os.listdir(run_dir) == [LOCK_FILE]:  # failed before writing anything
                (run_dir / LOCK_FILE).unlink(missing_ok=True)
                run_dir.rmdir()


def _train_locked(cfg: Config, run_dir: Path, resume: bool, replace: bool, dist: DistContext, progress_print) -> dict:
    if dist.is_main:
        removed = clean_stale(run_dir)  # we hold the lock: whoever left these is dead
        if removed:
            note(f"removed {len(removed)} leftover(s) of an interrupted write in '{run_dir}': {', '.join(removed[:3])}")
    # Every rank calls it: the first takes the cache folder's file lock and prepares, the others
    # block on that lock (no timeout) and then read the result -- a collective barrier here
    # would kill the job after LOOPMDM_DIST_TIMEOUT while a paper-size corpus is tokenized.
    data = prepare_data(cfg.data, progress=dist.is_main)
    attach_vocab(cfg, data)
    if resume:
        raw = json.loads(json.dumps(read_run_config(run_dir, say=note if dist.is_main else (lambda _m: None))))
        saved = config_from_dict(raw).to_dict()  # an older run's config, read as it was trained
        for section in ("model", "diffusion", "data"):
            for key, value in saved[section].items():
                if key not in (raw.get(section) or {}):  # an option added after this run was saved
                    setattr(getattr(cfg, section), key, value)
            same = NOT_IN_KEY if section == "data" else ()  # where and how fast it is prepared: free to change
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
        _write_run_files(cfg, data, run_dir)
        progress_print(f"run directory: {run_dir}")
    dist.barrier()
    if resume and dist.is_main:
        progress_print(f"resumed from step {trainer.step}")
    return trainer.train()
