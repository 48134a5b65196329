"""Checkpoints: weights and EMA weights as safetensors, the rest of the training state
(optimizer, step, counters, data-loader position, the config) as a torch file.

Layout:  RUN/checkpoints/step-000200/{model,ema}.safetensors + train_state.pt
         RUN/checkpoints/latest  (the name of the newest complete checkpoint)
         RUN/checkpoints/best.safetensors  (the weights evaluated, EMA where kept, at the lowest
                                            validation NELBO so far; step and NELBO in its metadata)
Writes are atomic: a checkpoint is assembled in a temporary folder, fsynced, renamed into
place, and only then does `latest` (itself replaced atomically) point at it. Re-saving an
existing step moves the old folder aside first; a kill between the two renames leaves
`latest` naming a missing folder, and readers (loopmdm/runs.py) then fall back to the newest
intact checkpoint, while the next writer moves the aside copy back (runfiles.clean_stale).
Any OSError while writing (a full disk) removes the partial folder and becomes one line.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from loopmdm.errors import LoopMDMError
from loopmdm.runfiles import TMP_MARK, disk_error, fault_point, fsync_dir, write_all, write_bytes_atomic, write_text_atomic

MODEL_FILE, EMA_FILE, STATE_FILE, LATEST = "model.safetensors", "ema.safetensors", "train_state.pt", "latest"
BEST_FILE, BEST_KEY = "best.safetensors", "loopmdm_best"


def _contiguous(state: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


STATE_KEYS = ("step", "tokens", "flops", "train_time", "interval", "loss_accum", "optimizer", "loader")
_STEP_NAME = re.compile(r"^step-(\d+)$")


def step_of(path: Path) -> int:
    return int(_STEP_NAME.match(path.name).group(1))


def step_folders(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders `step-N`, newest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _STEP_NAME.match(p.name) and p.is_dir()), key=step_of, reverse=True)


def read_latest(run_dir: str | Path) -> tuple[Path | None, str | None]:
    """(the folder `latest` names, None) or (None, what is wrong with `latest`)."""
    latest = Path(run_dir) / "checkpoints" / LATEST
    try:
        name = latest.read_bytes().decode("utf-8").strip()
    except FileNotFoundError:
        return None, f"'{latest}' is missing"
    except IsADirectoryError:
        return None, f"'{latest}' is a folder, not the file naming the newest checkpoint"
    except (OSError, UnicodeDecodeError):
        return None, f"'{latest}' is not readable text"
    if not _STEP_NAME.match(name):
        return None, f"'{latest}' names {name[:40]!r}, not a checkpoint folder step-N"
    path = latest.parent / name
    if not path.is_dir():
        return None, f"'{latest}' names {name}, which does not exist"
    return path, None


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict, ema_state: dict | None,
                    train_state: dict, keep: int = 2) -> Path:
    """Write checkpoint `step-{step}` atomically and point `latest` at it; keep the newest `keep`
    up to this step (newer folders belong to a timeline that a resume abandoned)."""
    ckpt_root = Path(run_dir) / "checkpoints"
    name = f"step-{step:07d}"
    tmp = ckpt_root / f"{TMP_MARK}{name}-{os.getpid()}"
    final, old = ckpt_root / name, None
    # What a failure keeps: the checkpoint `latest` names, else (latest unreadable) the newest
    # older folder, which --resume falls back to (runs.open_checkpoint).
    previous = read_latest(run_dir)[0] or next((p for p in step_folders(run_dir) if step_of(p) < step), None)
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        state_bytes = io.BytesIO()
        torch.save(train_state, state_bytes)
        files = [(MODEL_FILE, safetensors_bytes(_contiguous(model_state)))]
        if ema_state is not None:
            files.append((EMA_FILE, safetensors_bytes(_contiguous(ema_state))))
        files.append((STATE_FILE, state_bytes.getvalue()))
        for file_name, data in files:  # our own writes: an OSError (ENOSPC) is catchable here
            with open(tmp / file_name, "wb") as f:
                write_all(f, data, f"checkpoint {name}/{file_name}")
                f.flush()
                os.fsync(f.fileno())
        fsync_dir(tmp)
        fault_point(f"checkpoint {name}: complete, not yet renamed")
        if final.exists():  # re-saving a step: move the old copy aside, then the new one in
            old = ckpt_root / f".old-{name}-{os.getpid()}"
            os.replace(final, old)
            fault_point(f"checkpoint {name}: old copy moved aside")
        os.replace(tmp, final)
        fsync_dir(ckpt_root)
        fault_point(f"checkpoint {name}: renamed, latest not yet updated")
        write_text_atomic(ckpt_root / LATEST, name + "\n")
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not final.exists():
            os.replace(old, final)
        kept = (f"the last good checkpoint {previous.name} is kept" if previous is not None
                else "no earlier checkpoint exists")
        raise disk_error(exc, f"checkpoint {name} in '{ckpt_root}'", kept, "continue with --resume") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    older = [p for p in step_folders(run_dir) if step_of(p) < step]
    for stale in [p for p in step_folders(run_dir) if step_of(p) > step] + older[max(keep - 1, 0):]:
        shutil.rmtree(stale, ignore_errors=True)
        fault_point(f"checkpoint {name}: pruned {stale.name}")
    return final


def has_checkpoint(run_dir: str | Path) -> bool:
    return (Path(run_dir) / "checkpoints" / LATEST).is_file() or bool(step_folders(run_dir))


def checkpoint_path(run_dir: str | Path) -> Path:
    """The folder `latest` names, or a clear error (loopmdm/runs.py adds the fallback)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LoopMDMError(f"run directory '{run_dir}' does not exist (train one with `loopmdm train CONFIG`)")
    path, problem = read_latest(run_dir)
    if path is None:
        raise LoopMDMError(f"no usable checkpoint in '{run_dir}': {problem} (has this run saved a checkpoint yet?)")
    if not (path / MODEL_FILE).is_file():
        raise LoopMDMError(f"checkpoint '{path}' is missing its {MODEL_FILE}")
    return path


def load_weights(path: Path, use_ema: bool = True, require_ema: bool = False) -> dict:
    """Model weights (EMA ones when present and asked for) from a checkpoint folder. With
    `require_ema` a missing EMA file is an error instead of a silent switch to raw weights."""
    ema = path / EMA_FILE
    if use_ema and require_ema and not ema.is_file():
        raise LoopMDMError(f"checkpoint '{path}' has no {EMA_FILE}")
    file = ema if use_ema and ema.is_file() else path / MODEL_FILE
    if not file.is_file():
        raise LoopMDMError(f"checkpoint '{path}' has no {file.name}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoopMDMError(f"checkpoint file '{file}' is corrupt or unreadable ({str(exc).splitlines()[0]})") from None


def load_train_state(path: Path) -> dict:
    file = path / STATE_FILE
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling/zip failure means a damaged file
        raise LoopMDMError(f"training state '{file}' is corrupt or unreadable ({type(exc).__name__})") from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise LoopMDMError(f"training state '{file}' is incomplete (lacks {', '.join(missing)})")
    return state


# --- best-on-validation weights (early-stopping selection; suites report these on test) ----

def best_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / BEST_FILE


def save_best(run_dir: str | Path, state: dict, info: dict) -> None:
    """One file, replaced atomically: the weights and what they scored (step, val NELBO, ...)
    travel together, so a kill never pairs new weights with an old record."""
    path = best_path(run_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, safetensors_bytes(_contiguous(state), metadata={BEST_KEY: json.dumps(info)}))
    except OSError as exc:
        raise disk_error(exc, f"'{path}'", then="continue with --resume") from None


def read_best_info(run_dir: str | Path) -> dict | None:
    """The record stored with the best weights, or None if there are none (or they are damaged)."""
    path = best_path(run_dir)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})[BEST_KEY])
    except (SafetensorError, OSError, ValueError, KeyError):
        return None


def load_best(run_dir: str | Path) -> tuple[dict, dict]:
    """(weights, record) of the best-on-validation checkpoint."""
    path = best_path(run_dir)
    info = read_best_info(run_dir)
    if info is None:
        raise LoopMDMError(f"'{path}' is missing or damaged: this run has no best-on-validation weights "
                           f"(it saves them at each validation since data.train_tokens/test splits existed)")
    try:
        return load_file(str(path)), info
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoopMDMError(f"'{path}' is corrupt or unreadable ({str(exc).splitlines()[0]})") from None
