"""Run directories, training side: create (or reopen) one and train into it.
Reopening a run for evaluation and sampling is loopmdm/runs.py.

RUN/config.yaml       the resolved config (model.vocab_size filled in from the data)
RUN/data.json         where the prepared data lives and the tokenizer's fingerprint
RUN/tokenizer.json    a copy of the tokenizer, so sampling needs nothing else
RUN/metrics.jsonl     one JSON record per log / validation step
RUN/checkpoints/      see training/checkpoint.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from loopmdm.config import Config, save_config
from loopmdm.data.prepare import PreparedData, prepare_data
from loopmdm.errors import LoopMDMError, require
from loopmdm.runs import LoadedRun, check_tokenizer_match, load_run  # noqa: F401 (moved; old import path kept)
from loopmdm.training import checkpoint as ckpt
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


def train(cfg: Config, resume: bool = False, overwrite: bool = False, dist: DistContext | None = None,
          progress_print=print) -> dict:
    """Prepare data, set up (or reopen) the run directory, train, return the summary."""
    dist = dist or DistContext()
    run_dir = Path(cfg.train.out_dir)
    if ckpt.has_checkpoint(run_dir) and not resume and not overwrite:
        raise LoopMDMError(f"run directory '{run_dir}' already holds a checkpoint; pass --resume to continue it, "
                           f"--overwrite to replace it, or set train.out_dir to a new folder")
    if not resume and not overwrite and run_dir.is_dir() and any(run_dir.iterdir()):
        raise LoopMDMError(f"run directory '{run_dir}' is not empty (an earlier run that saved no checkpoint?); "
                           f"pass --overwrite to replace it or set train.out_dir to a new folder")
    if resume and not ckpt.has_checkpoint(run_dir):
        raise LoopMDMError(f"--resume: no checkpoint in '{run_dir}' to resume from")
    if dist.is_main and overwrite and not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    data = prepare_data(cfg.data, progress=dist.is_main) if dist.is_main else None
    dist.barrier()
    if data is None:
        data = prepare_data(cfg.data)
    attach_vocab(cfg, data)
    if resume:
        saved = json.loads(json.dumps(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))))
        for section in ("model", "diffusion", "data"):
            diff = _first_difference(saved[section], cfg.to_dict()[section], f"{section}.")
            require(diff is None, f"--resume with a different setting ({diff}); only train.* may change")
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        data.tokenizer.save(run_dir / "tokenizer.json")
        (run_dir / "data.json").write_text(json.dumps(
            {"prepared_path": str(data.path.resolve()), "tokenizer_fingerprint": data.tokenizer.fingerprint(),
             "vocab_size": data.vocab_size}, indent=2) + "\n")
        progress_print(f"run directory: {run_dir}")
    dist.barrier()
    trainer = Trainer(cfg, data, run_dir, dist)
    if resume:
        trainer.resume()
        if dist.is_main:
            progress_print(f"resumed from step {trainer.step}")
    return trainer.train()
