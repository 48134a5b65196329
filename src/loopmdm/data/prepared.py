"""The read side of prepared data: open a prepared folder and memory-map its blocks.

A prepared folder `<cache_dir>/<source>-<tokenizer>-<key>/` (written by data/prepare.py)
holds `tokenizer.json`, `train.bin`, `val.bin`, `test.bin` if it has a test split (raw uint16/uint32, shape (n_blocks,
seq_len)), the train unigram counts and `meta.json`, written last.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loopmdm.data.tokenizer import TextTokenizer
from loopmdm.errors import LoopMDMError, require

UNIGRAM_FILE = "train_unigram_counts.npy"
SPLITS = ("train", "val", "test")  # test only where data.test_fraction > 0 (meta n_test_blocks)
META_KEYS = ("vocab_size", "eos_id", "pad_id", "bos_id", "tokenizer", "tokenizer_fingerprint",
             "seq_len", "packing", "dtype", "n_train_blocks", "n_val_blocks")


@dataclass
class PreparedData:
    path: Path
    meta: dict
    tokenizer: TextTokenizer

    def blocks(self, split: str) -> np.ndarray:
        """Read-only memory map of shape (n_blocks, seq_len)."""
        require(split in SPLITS, f"split '{split}' is not allowed; choose one of: {', '.join(SPLITS)}")
        require(self.has_split(split), f"the data at '{self.path}' has no {split} split; prepare it with "
                                       f"data.test_fraction > 0 (e.g. 0.1)")
        n = int(self.meta[f"n_{split}_blocks"])
        dtype = np.dtype(self.meta["dtype"])
        if n == 0:  # np.memmap cannot map an empty file
            return np.zeros((0, self.seq_len), dtype=dtype)
        return np.memmap(self.path / f"{split}.bin", dtype=dtype, mode="r", shape=(n, self.seq_len))

    def has_split(self, split: str) -> bool:
        return f"n_{split}_blocks" in self.meta

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

    def difficulty(self, split: str) -> np.ndarray:
        """Per-row difficulty of fine-tuning pairs (-1 = unknown; all -1 for other data)."""
        path = self.path / f"{split}_difficulty.npy"
        n = int(self.meta.get(f"n_{split}_blocks", 0))
        return np.load(path) if path.is_file() else np.full(n, -1, dtype=np.int64)

    @property
    def prompt_sep_id(self) -> int | None:
        """Fine-tuning pairs: each row's prompt ends at its first token with this id (EOS)."""
        sep = self.meta.get("prompt_sep_id")
        return None if sep is None else int(sep)

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
    for split in (s for s in SPLITS if f"n_{s}_blocks" in meta):
        bin_path = path / f"{split}.bin"
        expected = int(meta[f"n_{split}_blocks"]) * int(meta["seq_len"]) * itemsize
        require(bin_path.is_file(), f"'{bin_path}' is missing; delete '{path}' and prepare again")
        size = bin_path.stat().st_size
        require(size == expected, f"'{bin_path}' has {size} bytes but meta.json implies {expected} "
                                  f"({meta[f'n_{split}_blocks']} blocks x {meta['seq_len']} x {itemsize}); "
                                  f"delete '{path}' and prepare again")
    return PreparedData(path=path, meta=meta, tokenizer=tokenizer)


def add_one_log_probs(counts: np.ndarray) -> np.ndarray:
    """log p(id) of the add-one (Laplace) smoothed unigram fitted to per-id `counts`."""
    counts = counts.astype(np.float64)
    return np.log((counts + 1.0) / (counts.sum() + len(counts)))
