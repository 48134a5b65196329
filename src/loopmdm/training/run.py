"""Run directories: create one for training, reopen one for evaluation and sampling.

RUN/config.yaml       the resolved config (model.vocab_size filled in from the data)
RUN/data.json         where the prepared data lives and the tokenizer's fingerprint
RUN/tokenizer.json    a copy of the tokenizer, so sampling needs nothing else
RUN/metrics.jsonl     one JSON record per log / validation step
RUN/checkpoints/      see training/checkpoint.py
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from loopmdm.config import Config, config_from_dict, save_config
from loopmdm.data.prepare import PreparedData, load_prepared, prepare_data
from loopmdm.data.tokenizer import TextTokenizer
from loopmdm.errors import LoopMDMError, require
from loopmdm.model.denoiser import LoopedDenoiser
from loopmdm.training import checkpoint as ckpt
from loopmdm.devices import resolve_device
from loopmdm.training.trainer import DistContext, Trainer


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


@dataclass
class LoadedRun:
    cfg: Config
    model: LoopedDenoiser
    tokenizer: TextTokenizer
    run_dir: Path
    step: int
    device: torch.device

    def prepared_data(self) -> PreparedData:
        """The run's own prepared data (re-prepared deterministically if the cache was deleted)."""
        info = json.loads((self.run_dir / "data.json").read_text())
        path = Path(info["prepared_path"])
        data = load_prepared(path) if (path / "meta.json").is_file() else prepare_data(self.cfg.data)
        check_tokenizer_match(self, data)
        return data


def check_tokenizer_match(run: LoadedRun, data: PreparedData) -> None:
    require(data.tokenizer.fingerprint() == run.tokenizer.fingerprint() and data.vocab_size == run.cfg.model.vocab_size,
            f"tokenizer mismatch: data at '{data.path}' uses {data.meta.get('tokenizer')} with {data.vocab_size} tokens "
            f"(fingerprint {data.tokenizer.fingerprint()}), the run uses {run.cfg.model.vocab_size} tokens "
            f"(fingerprint {run.tokenizer.fingerprint()})")


def load_run(run_dir: str | Path, device: str = "auto", use_ema: bool = True) -> LoadedRun:
    """Rebuild the model of a run from its config and newest checkpoint (EMA weights by default)."""
    run_dir = Path(run_dir)
    path = ckpt.checkpoint_path(run_dir)
    config_file = run_dir / "config.yaml"
    require(config_file.is_file(), f"run directory '{run_dir}' has no config.yaml")
    try:
        saved = OmegaConf.to_container(OmegaConf.load(config_file))
    except Exception:
        raise LoopMDMError(f"'{config_file}' is not valid YAML") from None
    cfg = config_from_dict(saved)
    dev = resolve_device(device)
    model = LoopedDenoiser(cfg.model)
    state = ckpt.load_weights(path, use_ema=use_ema)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise LoopMDMError(f"checkpoint '{path}' does not fit the run's config: {str(exc).splitlines()[1].strip()}") from None
    require(not missing and not unexpected,
            f"checkpoint '{path}' does not fit the run's config (missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    model.to(dev).eval()
    tokenizer = TextTokenizer.load(run_dir / "tokenizer.json", cfg.data.tokenizer)
    step = int(path.name.split("-")[-1])
    return LoadedRun(cfg, model, tokenizer, run_dir, step, dev)
