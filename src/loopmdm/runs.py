"""Reopen a run directory for inference: evaluation, sampling, analysis.

RUN/config.yaml       the resolved config (model.vocab_size filled in from the data)
RUN/data.json         where the prepared data lives and the tokenizer's fingerprint
RUN/tokenizer.json    a copy of the tokenizer, so sampling needs nothing else
RUN/metrics.jsonl     one JSON record per log / validation step
RUN/checkpoints/      see checkpoint.py

Training writes run directories (training/run.py); nothing here imports the trainer.
`load_run` also opens a Hugging Face export of a run (`loopmdm export`, export/hf.py):
config.json + model.safetensors + tokenizer.json + loopmdm_config.yaml (`load_exported`).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer

from loopmdm.config import Config, config_from_dict
from loopmdm.data.prepare import BlockWriter, prepare_data
from loopmdm.data.prepared import UNIGRAM_FILE, PreparedData, add_one_log_probs, load_prepared
from loopmdm.data.tokenizer import TextTokenizer
from loopmdm.devices import resolve_device
from loopmdm.errors import LoopMDMError, require
from loopmdm.model.denoiser import LoopedDenoiser
from loopmdm.runfiles import note
from loopmdm import checkpoint as ckpt

T = TypeVar("T")

# A Hugging Face export (export/hf.py writes it): the files this module reads back.
EXPORT_CONFIG, EXPORT_RUN_CONFIG, EXPORT_WEIGHTS, EXPORT_TOKENIZER = (
    "config.json", "loopmdm_config.yaml", "model.safetensors", "tokenizer.json")


# --------------------------------------------------------------------------- checkpoints

def open_checkpoint(run_dir: str | Path, load: Callable[[Path], T], say: Callable[[str], None] = note) -> tuple[Path, T]:
    """`load(folder)` on the checkpoint `latest` names; if that is missing or damaged (a
    LoopMDMError from `load`), on the newest intact one instead, saying so in one line."""
    run_dir = Path(run_dir)
    require(run_dir.exists(), f"run directory '{run_dir}' does not exist (train one with `loopmdm train CONFIG`)")
    require(run_dir.is_dir(), f"'{run_dir}' is a file, not a run directory")
    named, problem = ckpt.read_latest(run_dir)
    candidates = ([named] if named else []) + [p for p in ckpt.step_folders(run_dir) if p != named]
    require(candidates, f"no checkpoint in '{run_dir}' (has this run saved a checkpoint yet?)")
    failures = []
    for path in candidates:
        try:
            result = load(path)
        except LoopMDMError as exc:
            failures.append(str(exc))
            continue
        if problem or failures:
            say(f"{problem or failures[0]}; using {path.name}, the newest intact checkpoint")
        return path, result
    raise LoopMDMError(f"no intact checkpoint in '{run_dir}': {failures[0]}"
                       + (f" (and {len(failures) - 1} older ones fail too)" if len(failures) > 1 else ""))


def read_run_config(run_dir: Path, say: Callable[[str], None] = note) -> dict:
    """RUN/config.yaml as a dict; if it is missing or damaged, the copy every checkpoint holds."""
    path = Path(run_dir) / "config.yaml"
    problem = None
    try:
        saved = OmegaConf.to_container(OmegaConf.load(path))
        if isinstance(saved, dict) and all(isinstance(saved.get(k), dict) for k in ("model", "data", "train")):
            return saved
        problem = f"'{path}' is empty or not a run config"
    except FileNotFoundError:
        problem = f"'{path}' is missing"
    except Exception:
        problem = f"'{path}' is not valid YAML"

    def stored_config(folder: Path) -> dict:
        config = ckpt.load_train_state(folder).get("config")
        require(isinstance(config, dict), f"checkpoint '{folder}' holds no copy of the config (older format)")
        return config

    try:
        folder, saved = open_checkpoint(run_dir, stored_config, say=lambda _msg: None)
    except LoopMDMError as exc:
        raise LoopMDMError(f"{problem}, and no checkpoint holds a copy ({exc}); restore config.yaml "
                           f"(the run's training command with its overrides gives it)") from None
    say(f"{problem}; using the copy of the config stored in checkpoint {folder.name}")
    return saved


# --------------------------------------------------------------------------- runs

@dataclass
class LoadedRun:
    cfg: Config
    model: LoopedDenoiser
    tokenizer: TextTokenizer
    run_dir: Path
    step: int
    device: torch.device

    def prepared_data(self) -> PreparedData:
        """The run's own prepared data (re-prepared deterministically if the cache or
        RUN/data.json was deleted)."""
        path = recorded_data_path(self.run_dir)
        if path is None:
            note(f"'{self.run_dir / 'data.json'}' is missing or damaged; preparing the run's data from its config")
        if path is not None and (path / "meta.json").is_file():
            data = load_prepared(path)
        else:
            data = prepare_data(self.cfg.data, progress=True)
        check_tokenizer_match(self, data)
        return data

    def text_blocks(self, patterns: list[str]) -> tuple[np.ndarray, dict]:
        """Files (paths or globs, one document each) tokenized with the run's tokenizer and
        packed with its seq_len and packing; nothing is dropped: the last partial block of
        `wrap` packing is padded (pads are never scored). Returns (blocks, info)."""
        from loopmdm.data.corpus import expand_paths, read_text_file
        from loopmdm.userfiles import check_text_file

        try:
            files = expand_paths(patterns)
        except LoopMDMError as exc:
            raise LoopMDMError(str(exc).replace("data.paths", "--text")) from None
        require_text_run(self, "--text")
        for f in files:  # another run's text would be scored as whatever tokens it maps to: refuse
            check_text_file(f, "--text file")
        texts = [t for t in (read_text_file(f) for f in files) if t]
        require(texts, f"--text {' '.join(patterns)}: the files are empty")
        d, tok = self.cfg.data, self.tokenizer
        require(d.packing in ("wrap", "pad"), f"--text scores text for runs on text data, not data.packing={d.packing}")
        with tempfile.TemporaryDirectory(prefix="loopmdm-text-") as tmp:
            writer = BlockWriter(Path(tmp) / "text.bin", d.packing, d.seq_len, tok.eos_id, tok.pad_id,
                                 tok.vocab_size, np.dtype(np.int64))
            for ids in tok.encode_batch(texts):
                writer.add(ids)
            tail = writer.buffer.copy() if d.packing == "wrap" else np.empty(0, dtype=np.int64)
            writer.close()
            blocks = np.fromfile(Path(tmp) / "text.bin", dtype=np.int64).reshape(-1, d.seq_len)
        if len(tail):
            row = np.full((1, d.seq_len), tok.pad_id, dtype=np.int64)
            row[0, :len(tail)] = tail
            blocks = np.concatenate([blocks, row])
        info = {"files": len(files), "documents": len(texts), "blocks": len(blocks),
                "tokens": int((blocks != tok.pad_id).sum())}
        return blocks, info

    def unigram_xent(self, blocks: np.ndarray) -> float:
        """Cross-entropy of `blocks` (pads excluded) under the add-one unigram of the run's own
        train split: the floor to beat. NaN when the run's prepared data is gone."""
        prepared = recorded_data_path(self.run_dir)
        try:
            counts = np.load(prepared / UNIGRAM_FILE)
        except (OSError, ValueError, TypeError):  # TypeError: no record
            return float("nan")
        tokens = np.asarray(blocks).reshape(-1).astype(np.int64)
        tokens = tokens[tokens != self.tokenizer.pad_id]
        if len(counts) != self.tokenizer.vocab_size or not len(tokens):
            return float("nan")
        return float(-add_one_log_probs(counts)[tokens].mean())


def recorded_data_path(run_dir: str | Path) -> Path | None:
    """The prepared folder RUN/data.json names (absolute, wherever the cache was), or None
    when the record is missing or damaged."""
    try:
        return Path(json.loads((Path(run_dir) / "data.json").read_text(encoding="utf-8"))["prepared_path"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_tokenizer_match(run: LoadedRun, data: PreparedData) -> None:
    require(data.tokenizer.fingerprint() == run.tokenizer.fingerprint() and data.vocab_size == run.cfg.model.vocab_size,
            f"tokenizer mismatch: data at '{data.path}' uses {data.meta.get('tokenizer')} with {data.vocab_size} tokens "
            f"(fingerprint {data.tokenizer.fingerprint()}), the run uses {run.cfg.model.vocab_size} tokens "
            f"(fingerprint {run.tokenizer.fingerprint()})")
    require(data.seq_len == run.cfg.data.seq_len,
            f"data at '{data.path}' was prepared with seq_len={data.seq_len}, the run was trained with "
            f"data.seq_len={run.cfg.data.seq_len}; prepare it with data.seq_len={run.cfg.data.seq_len} "
            f"(or score text files with --text)")


def is_export(path: str | Path) -> bool:
    """A folder written by `loopmdm export` (and not a run directory)."""
    path = Path(path)
    return ((path / EXPORT_CONFIG).is_file() and (path / EXPORT_RUN_CONFIG).is_file()
            and not (path / "checkpoints").exists())


def require_text_run(run: LoadedRun, what: str) -> None:
    """Text can only be scored by a language model: a task or pairs run has its own vocabulary
    or a prompt/answer layout, and would give a meaningless number."""
    source = run.cfg.data.source
    require(source not in ("task", "pairs"),
            f"{what}: run '{run.run_dir}' was trained on data.source={source}"
            + (f" ({run.cfg.data.task})" if source == "task" else "")
            + ", not on text, so it cannot score text; use `loopmdm solve` for it, or a language-model run")


def load_run(run_dir: str | Path, device: str = "auto", use_ema: bool = True, best: bool = False) -> LoadedRun:
    """Rebuild the model of a run from its config and newest intact checkpoint (EMA weights by
    default; a checkpoint whose EMA file is missing counts as damaged unless use_ema=False).
    `best`: the weights of its lowest validation NELBO instead (checkpoints/best.safetensors).
    A `loopmdm export` folder is opened with `load_exported`."""
    run_dir = Path(run_dir)
    require(run_dir.exists(), f"run directory '{run_dir}' does not exist (train one with `loopmdm train CONFIG`)")
    require(run_dir.is_dir(), f"'{run_dir}' is a file, not a run directory")
    if is_export(run_dir):
        return load_exported(run_dir, device=device, use_ema=use_ema)
    require(not ((run_dir / "meta.json").is_file() and not (run_dir / "checkpoints").exists()),
            f"'{run_dir}' is a prepared data folder, not a run directory (one written by `loopmdm train`)")
    require(ckpt.has_checkpoint(run_dir), f"no checkpoint in '{run_dir}' (has this run saved a checkpoint yet?)")
    cfg = config_from_dict(read_run_config(run_dir))
    dev = resolve_device(device)

    def load_model(path: Path) -> LoopedDenoiser:
        model = LoopedDenoiser(cfg.model)
        try:
            state = ckpt.load_weights(path, use_ema=use_ema, require_ema=use_ema and cfg.train.ema > 0)
        except LoopMDMError as exc:
            if use_ema and "has no ema.safetensors" in str(exc):
                raise LoopMDMError(f"{exc} (--no-ema uses its raw weights)") from None
            raise
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatch
            raise LoopMDMError(f"checkpoint '{path}' does not fit the run's config: {str(exc).splitlines()[1].strip()}") from None
        require(not missing and not unexpected,
                f"checkpoint '{path}' does not fit the run's config (missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
        return model

    if best:
        state, info = ckpt.load_best(run_dir)
        model = LoopedDenoiser(cfg.model)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise LoopMDMError(f"'{ckpt.best_path(run_dir)}' does not fit the run's config: "
                               f"{str(exc).splitlines()[-1].strip()[:160]}") from None
        step = int(info["step"])
    else:
        path, model = open_checkpoint(run_dir, load_model)
        step = ckpt.step_of(path)
    model.to(dev).eval()
    tokenizer = TextTokenizer.load(run_dir / "tokenizer.json", cfg.data.tokenizer)
    return LoadedRun(cfg, model, tokenizer, run_dir, step, dev)


def tokenizer_without_mask(path: Path, mask_id: int) -> Tokenizer:
    """An export's tokenizer.json less the [MASK] token the export added at id `mask_id`:
    the run's own tokenizer again (same fingerprint, so the run's prepared data still fits)."""
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        spec["added_tokens"] = [t for t in spec.get("added_tokens", []) if t.get("id") != mask_id]
        return Tokenizer.from_str(json.dumps(spec))
    except Exception as exc:  # unreadable, not JSON, or not a tokenizer
        first = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoopMDMError(f"cannot load tokenizer file '{path}': {first}") from None


def load_exported(export_dir: str | Path, device: str = "auto", use_ema: bool = True) -> LoadedRun:
    """A `loopmdm export` folder as a LoadedRun (the same model, tokenizer and run config as
    the run it came from), so `loopmdm eval/sample/solve/analyze` accept it like a run."""
    export_dir = Path(export_dir)
    require(is_export(export_dir), f"'{export_dir}' is not a loopmdm export (it needs {EXPORT_CONFIG} and "
                                   f"{EXPORT_RUN_CONFIG}; write one with `loopmdm export RUN OUT_DIR`)")
    try:
        hf_config = json.loads((export_dir / EXPORT_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LoopMDMError(f"'{export_dir / EXPORT_CONFIG}' is not readable JSON ({type(exc).__name__})") from None
    require(isinstance(hf_config, dict) and hf_config.get("model_type") == "loopmdm",
            f"'{export_dir / EXPORT_CONFIG}' is not a LoopMDM config (model_type "
            f"{hf_config.get('model_type') if isinstance(hf_config, dict) else None!r}, expected 'loopmdm')")
    weights = hf_config.get("loopmdm_weights", "ema")
    require(use_ema or weights == "raw", f"'{export_dir}' holds only the {weights} weights it was exported with "
                                         f"(--no-ema needs an export written with --no-ema)")
    cfg = config_from_dict(read_run_config_file(export_dir / EXPORT_RUN_CONFIG))
    require(hf_config.get("vocab_size") == cfg.model.vocab_size,
            f"'{export_dir}': {EXPORT_CONFIG} has vocab_size={hf_config.get('vocab_size')}, "
            f"{EXPORT_RUN_CONFIG} model.vocab_size={cfg.model.vocab_size}")
    model = LoopedDenoiser(cfg.model)
    file = export_dir / EXPORT_WEIGHTS
    require(file.is_file(), f"export '{export_dir}' has no {EXPORT_WEIGHTS}")
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoopMDMError(f"weights file '{file}' is corrupt or unreadable ({str(exc).splitlines()[0]})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise LoopMDMError(f"'{file}' does not fit {EXPORT_RUN_CONFIG}: {str(exc).splitlines()[1].strip()}") from None
    dev = resolve_device(device)
    model.to(dev).eval()
    tokenizer = TextTokenizer(tokenizer_without_mask(export_dir / EXPORT_TOKENIZER, cfg.model.vocab_size),
                              cfg.data.tokenizer)
    require(tokenizer.vocab_size == cfg.model.vocab_size,
            f"'{export_dir / EXPORT_TOKENIZER}' has {tokenizer.vocab_size} tokens without the mask, the model {cfg.model.vocab_size}")
    return LoadedRun(cfg, model, tokenizer, export_dir, int(hf_config.get("loopmdm_step", 0)), dev)


def read_run_config_file(path: Path) -> dict:
    try:
        saved = OmegaConf.to_container(OmegaConf.load(path))
    except Exception:
        raise LoopMDMError(f"'{path}' is missing or not valid YAML") from None
    require(isinstance(saved, dict) and all(isinstance(saved.get(k), dict) for k in ("model", "data", "train")),
            f"'{path}' is empty or not a run config")
    return saved
