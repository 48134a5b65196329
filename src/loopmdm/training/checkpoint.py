"""Checkpoints: weights and EMA weights as safetensors, the rest of the training state
(optimizer, step, RNG states, data-loader position, counters) as a torch file.

Layout:  RUN/checkpoints/step-000200/{model,ema}.safetensors + train_state.pt
         RUN/checkpoints/latest  (the name of the newest complete checkpoint)
Writes are atomic: a checkpoint is assembled in a temporary folder, renamed into place,
and only then does `latest` (itself replaced atomically) point at it. A crash at any
moment leaves the previous checkpoint intact and `latest` valid.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from loopmdm.errors import LoopMDMError

MODEL_FILE, EMA_FILE, STATE_FILE, LATEST = "model.safetensors", "ema.safetensors", "train_state.pt", "latest"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _contiguous(state: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict, ema_state: dict | None,
                    train_state: dict, keep: int = 2) -> Path:
    """Write checkpoint `step-{step}` atomically and point `latest` at it; keep the newest `keep`."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_contiguous(model_state), str(tmp / MODEL_FILE))
    if ema_state is not None:
        save_file(_contiguous(ema_state), str(tmp / EMA_FILE))
    torch.save(train_state, tmp / STATE_FILE)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    final = ckpt_root / name
    if final.exists():  # re-saving the same step (e.g. final == periodic): move the old aside first
        old = ckpt_root / f".old-{name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    write_text_atomic(ckpt_root / LATEST, name + "\n")
    for stale in sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def has_checkpoint(run_dir: str | Path) -> bool:
    return (Path(run_dir) / "checkpoints" / LATEST).is_file()


def checkpoint_path(run_dir: str | Path) -> Path:
    """The folder of the newest complete checkpoint, or a clear error."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LoopMDMError(f"run directory '{run_dir}' does not exist (train one with `loopmdm train CONFIG`)")
    latest = run_dir / "checkpoints" / LATEST
    if not latest.is_file():
        raise LoopMDMError(f"no checkpoint in '{run_dir}': expected '{latest}' (has this run saved a checkpoint yet?)")
    path = run_dir / "checkpoints" / latest.read_text().strip()
    if not (path / MODEL_FILE).is_file():
        raise LoopMDMError(f"checkpoint '{path}' named by '{latest}' is missing its {MODEL_FILE}")
    return path


def load_weights(path: Path, use_ema: bool = True) -> dict:
    """Model weights (EMA ones when present and asked for) from a checkpoint folder."""
    file = path / EMA_FILE if use_ema and (path / EMA_FILE).is_file() else path / MODEL_FILE
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoopMDMError(f"checkpoint file '{file}' is corrupt or unreadable ({str(exc).splitlines()[0]})") from None


def load_train_state(path: Path) -> dict:
    file = path / STATE_FILE
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling/zip failure means a damaged file
        raise LoopMDMError(f"training state '{file}' is corrupt or unreadable ({type(exc).__name__})") from None
