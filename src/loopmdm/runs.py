"""Reopen a run directory for inference: evaluation, sampling, analysis.

RUN/config.yaml       the resolved config (model.vocab_size filled in from the data)
RUN/data.json         where the prepared data lives and the tokenizer's fingerprint
RUN/tokenizer.json    a copy of the tokenizer, so sampling needs nothing else
RUN/metrics.jsonl     one JSON record per log / validation step
RUN/checkpoints/      see training/checkpoint.py

Training writes run directories (training/run.py); nothing here imports the trainer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from loopmdm.config import Config, config_from_dict
from loopmdm.data.prepare import PreparedData, load_prepared, prepare_data
from loopmdm.data.tokenizer import TextTokenizer
from loopmdm.devices import resolve_device
from loopmdm.errors import LoopMDMError, require
from loopmdm.model.denoiser import LoopedDenoiser
from loopmdm.training import checkpoint as ckpt


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
