"""Preparation at the paper's scale, on small files: streamed Hugging Face formats, long
documents encoded in pieces, worker processes, resuming and cache reuse.

The real GPT-2 / bert-base-uncased files are not available at test time (no downloads):
tokenizers are trained here (byte-level BPE with GPT-2's pre-tokenizer, WordPiece with
BERT's) or hand-made in the real file formats. benchmarks/prepare_throughput.py checks
the piece-wise encoding against the real GPT-2 and BERT vocabularies.
"""

from __future__ import annotations

import glob
import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from loopmdm.config import DataConfig, load_config
from loopmdm.data import encode, prepare
from loopmdm.data.corpus import _unit_hash, lm1b_detokenizer, normalize_text
from loopmdm.data.encode import split_text
from loopmdm.data.prepare import BlockWriter, prepare_data, prepared_path
from loopmdm.data.tokenizer import TextTokenizer
from loopmdm.errors import LoopMDMError
from tests.conftest import bbc_glob


def bbc_texts(n: int = 60) -> list[str]:
    return [normalize_text(Path(p).read_bytes()) for p in sorted(glob.glob(bbc_glob()))[:n]]


def write_corpus(folder: Path) -> Path:
    """24 BBC articles, one file each, and one long single-line document (all 60 joined)."""
    folder.mkdir()
    texts = bbc_texts()
    for i, text in enumerate(texts[:24]):
        (folder / f"doc_{i:02d}.txt").write_text(text, encoding="utf-8")
    (folder / "long_line.txt").write_text(" ".join(t.replace("\n", " ") for t in texts), encoding="utf-8")
    return folder


def text_cfg(corpus: Path, cache: Path, **kw) -> DataConfig:
    base = dict(source="text", paths=[str(corpus / "*.txt")], bpe_vocab_size=400, seq_len=32,
                val_fraction=0.2, cache_dir=str(cache), num_proc=1)
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces of 500 characters and work items of 4,000: the long document spans many
    pieces and items, as a 50 MB line does at the real sizes."""
    monkeypatch.setattr(encode, "MAX_PIECE_CHARS", 500)
    monkeypatch.setattr(prepare, "ITEM_CHARS", 4000)


def files(path: Path) -> dict:
    return {name: (path / name).read_bytes() for name in ("train.bin", "val.bin", "tokenizer.json",
                                                        "train_unigram_counts.npy")}


# --- long documents in pieces ----------------------------------------------------------

def trained(kind: str, texts: list[str]) -> Tokenizer:
    """GPT-2's byte-level pre-tokenizer + BPE, or BERT's normalizer, pre-tokenizer + WordPiece."""
    if kind == "byte-bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
    else:
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=600, special_tokens=["[UNK]"], show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


@pytest.mark.parametrize("kind", ["byte-bpe", "wordpiece"])
def test_pieces_encode_to_the_same_ids_as_the_whole_text(kind):
    texts = bbc_texts()
    tok = trained(kind, texts)
    single_line = " ".join(t.replace("\n", " ") for t in texts)
    n_cuts = 0
    for text in texts + [single_line, "x\n\n  y z\n\nword  two\t\ttabs " * 40]:
        pieces = split_text(text, 200)
        assert "".join(pieces) == text and max(map(len, pieces)) <= 200
        n_cuts += len(pieces) - 1
        whole = tok.encode(text, add_special_tokens=False).ids
        parts = [i for e in tok.encode_batch(pieces, add_special_tokens=False) for i in e.ids]
        assert parts == whole
    assert n_cuts > 1000  # the check covered many cuts
    # Where it can differ: a run without spaces or newlines longer than a piece is cut hard.
    assert split_text("a" * 450, 200) == ["a" * 200, "a" * 200, "a" * 50]


def test_the_projects_bpe_trains_on_pieces_to_the_whole_documents_vocabulary(monkeypatch):
    """data.tokenizer=bpe is trained on pieces (the trainer pre-tokenizes each input at once:
    a 50 MB line held ~5 GB); cut where the pre-tokenizer splits anyway, they give the same
    word counts, so the same merges, as the whole documents, and encode to the same ids."""
    from loopmdm.data import tokenizer as tokenizer_module
    from loopmdm.data.tokenizer import build_tokenizer

    texts = bbc_texts()
    texts.append(" ".join(t.replace("\n", " ") for t in texts))  # one long line
    cfg = DataConfig(tokenizer="bpe", bpe_vocab_size=600)
    monkeypatch.setattr(encode, "MAX_PIECE_CHARS", 10**9)  # no cut: each document whole
    whole = build_tokenizer(cfg, texts)
    monkeypatch.setattr(encode, "MAX_PIECE_CHARS", 200)
    seen, real = [], tokenizer_module.iter_pieces
    monkeypatch.setattr(tokenizer_module, "iter_pieces", lambda text: (seen.append(len(p)) or p for p in real(text)))
    in_pieces = build_tokenizer(cfg, texts)
    assert max(seen) <= 200 and len(seen) > 1000  # the trainer saw pieces only, many of them
    assert in_pieces.tok.to_str() == whole.tok.to_str()
    for text in texts[-3:]:
        ids = [i for e in in_pieces.tok.encode_batch(split_text(text, 200), add_special_tokens=False) for i in e.ids]
        assert ids == whole.encode(text)


def test_a_long_single_line_document_is_encoded_in_bounded_pieces(tmp_path, small_pieces, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus")
    seen = []
    real = encode.encode_pieces
    monkeypatch.setattr(encode, "encode_pieces", lambda tok, pieces: seen.append(max(map(len, pieces))) or real(tok, pieces))
    data = prepare_data(text_cfg(corpus, tmp_path / "cache", packing="pad", seq_len=64))
    assert max(seen) <= 500
    # The pieces give exactly the blocks of the whole documents encoded in one call each.
    tok = data.tokenizer
    splits = {"train": [], "val": []}
    for path in sorted(corpus.glob("*.txt")):
        split = "val" if path.name in _val_ids(text_cfg(corpus, tmp_path)) else "train"  # ids: relative paths
        splits[split].append(tok.encode(normalize_text(path.read_bytes())))
    for split, docs in splits.items():
        writer = BlockWriter(tmp_path / f"{split}.ref", "pad", 64, tok.eos_id, tok.pad_id, tok.vocab_size,
                             np.dtype(data.meta["dtype"]))
        for ids in docs:
            writer.add(ids)
        writer.close()
        assert (tmp_path / f"{split}.ref").read_bytes() == (data.path / f"{split}.bin").read_bytes()
    assert max(len(d) for d in splits["train"] + splits["val"]) > 20 * 64  # the long line is there


def _val_ids(cfg: DataConfig) -> set:
    from loopmdm.data.corpus import SplitCorpus
    return {doc_id for doc_id, split in SplitCorpus(cfg)._split_of.items() if split == "val"}


# --- workers, resuming, cache ----------------------------------------------------------

def test_worker_processes_write_the_same_bytes_as_one_process(tmp_path, small_pieces):
    corpus = write_corpus(tmp_path / "corpus")
    serial = prepare_data(text_cfg(corpus, tmp_path / "c1", num_proc=1))
    parallel = prepare_data(text_cfg(corpus, tmp_path / "c2", num_proc=2))
    assert serial.path.name == parallel.path.name  # num_proc is not part of the cache key
    assert files(serial.path) == files(parallel.path)
    strip = lambda meta: {k: v for k, v in meta.items() if k != "data_config"}
    assert strip(serial.meta) == strip(parallel.meta) and serial.meta["n_train_blocks"] > 50


def test_an_interrupted_preparation_resumes_to_the_same_bytes(tmp_path, small_pieces, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus")
    cfg = text_cfg(corpus, tmp_path / "cache", packing="pad")
    monkeypatch.setattr(prepare, "CHECKPOINT_SECONDS", 0.0)
    real_encode, real_save = prepare.encode_items, prepare._save_progress
    saves = []

    def save_once(*args):  # one checkpoint early on; later items are written but not recorded
        saves.append(args[2])
        if len(saves) == 3:
            real_save(*args)

    def interrupted(*args):
        for n, item in enumerate(real_encode(*args)):
            if n == 12:
                raise KeyboardInterrupt  # as if the user pressed Ctrl-C
            yield item

    monkeypatch.setattr(prepare, "_save_progress", save_once)
    monkeypatch.setattr(prepare, "encode_items", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg)
    partial = tmp_path / "cache" / f".partial-{prepared_path(cfg).name}"
    assert (partial / "progress.json").is_file() and not prepared_path(cfg).exists()
    checkpoint = json.loads((partial / "progress.json").read_text())
    assert checkpoint["skip"] == saves[2][1] > 0
    written = sum((partial / f"{split}.bin").stat().st_size for split in ("train", "val"))
    recorded = sum(checkpoint["writers"][split]["n_blocks"] * 32 * 2 for split in ("train", "val"))
    assert written > recorded  # blocks written past the checkpoint, to be cut off on resume

    resumed_at = []
    monkeypatch.setattr(prepare, "_save_progress", real_save)
    monkeypatch.setattr(prepare, "encode_items", real_encode)
    original = prepare._work_items
    monkeypatch.setattr(prepare, "_work_items", lambda corpus, stream, skip: resumed_at.append(skip) or original(corpus, stream, skip))
    resumed = prepare_data(cfg)
    assert resumed_at == [checkpoint["skip"]] and not partial.exists()
    fresh = prepare_data(replace(cfg, cache_dir=str(tmp_path / "fresh")))
    assert files(resumed.path) == files(fresh.path)
    assert resumed.meta["n_train_tokens"] == fresh.meta["n_train_tokens"]


def test_a_finished_preparation_is_reused_and_the_key_follows_what_changes_the_bytes(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus")
    cfg = text_cfg(corpus, tmp_path / "cache")
    first = prepare_data(cfg)

    def no_work(*args):
        raise AssertionError("a cached preparation was rebuilt")

    monkeypatch.setattr(prepare, "encode_items", no_work)
    assert prepare_data(cfg).path == first.path
    assert prepare_data(replace(cfg, num_proc=2)).path == first.path
    for changed in (replace(cfg, seq_len=64), replace(cfg, packing="pad"), replace(cfg, tokenizer="gpt2")):
        assert prepared_path(changed) != first.path
    tok_file = tmp_path / "tokenizer.json"
    first.tokenizer.save(tok_file)
    with_file = replace(cfg, tokenizer_path=str(tok_file))
    before = prepared_path(with_file)
    tok_file.write_text(tok_file.read_text().replace('"<|pad|>"', '"<|PAD|>"'))  # another tokenizer, same path
    assert prepared_path(with_file) != before


def test_block_writer_fed_in_pieces_and_resumed_matches_whole_documents(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50, size=n) for n in (3, 17, 0, 40, 9, 64, 100, 1)]
    for packing in ("wrap", "pad"):
        whole = BlockWriter(tmp_path / f"{packing}.whole", packing, 16, 99, 100, 101, np.dtype(np.uint16))
        for d in docs:
            whole.add(d.tolist())
        whole.close()
        flat = np.concatenate(docs)
        ends = np.cumsum([len(d) for d in docs])
        cuts = [0, 5, 20, 21, 60, 61, 200, len(flat)]  # pieces that split documents anywhere
        path = tmp_path / f"{packing}.pieces"
        writer = BlockWriter(path, packing, 16, 99, 100, 101, np.dtype(np.uint16))
        for k, (a, b) in enumerate(zip(cuts, cuts[1:])):
            if k == 4:  # checkpoint at a document boundary, write more, then resume from the checkpoint
                assert a == ends[3]
                state = json.loads(json.dumps({**writer.state(), "counts": writer.counts.tolist()}))
                writer.extend(flat[a:b], [e - a for e in ends if a < e <= b])  # lost with the "crash"
                writer.close()
                writer = BlockWriter(path, packing, 16, 99, 100, 101, np.dtype(np.uint16), state=state)
            writer.extend(flat[a:b], [e - a for e in ends if a < e <= b])
        writer.close()
        assert path.read_bytes() == (tmp_path / f"{packing}.whole").read_bytes()
        assert np.array_equal(writer.counts, whole.counts) and writer.n_docs == whole.n_docs == len(docs)


# --- the paper's corpora, streamed from local files of the real format -----------------

def sentences(n: int) -> list[str]:
    """LM1B-style lines: one news sentence, its tokens separated by spaces."""
    rng = random.Random(0)
    templates = ['The company said profits rose {} % , to $ {} million .',
                 'It \'s " the best year yet , " he said on {} .',
                 'Details are at http : / / www.example{}.com ( see page {} ) ?',
                 'Shares fell {} cents ; analysts had expected {} !']
    return [rng.choice(templates).format(rng.randint(1, 99), rng.randint(1, 99)) for _ in range(n)]


def write_bert_vocab(folder: Path, texts: list[str]) -> str:
    """A vocab.txt (bert-base-uncased format) with every word of `texts`: no [UNK]."""
    pre = pre_tokenizers.BertPreTokenizer()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t.lower())})
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    return str(folder)


def write_gpt2_files(folder: Path) -> str:
    """vocab.json + merges.txt in GPT-2's format: the 256 byte symbols, a few merges, EOS."""
    from tests.test_data import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    merges = ["Ġ t", "h e", "Ġt he", "i n", "e r", "Ġ a"]
    for m in merges:
        vocab["".join(m.split())] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return str(folder)


def write_rows(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)  # several row groups
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def offline_hf(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def paper_cfg(preset: str, tmp_path: Path, data_file: Path, *extra: str):
    """A paper preset pointed at a local sample (a `data_files` path instead of the Hub)."""
    builder = "parquet" if data_file.suffix == ".parquet" else "json"
    return load_config(preset, [f"data.hf_name={builder}", "data.hf_config=''", f"data.paths=['{data_file}']",
                                f"data.cache_dir={tmp_path / 'cache'}", *extra]).data


def expected_blocks(tok: TextTokenizer, texts: list[str], seq_len: int) -> np.ndarray:
    flat = np.concatenate([np.append(tok.encode(t), tok.eos_id) for t in texts])
    n = len(flat) // seq_len
    return flat[: n * seq_len].reshape(n, seq_len)


def test_lm1b_streamed_from_parquet_detokenized_bert_wrapped(tmp_path, offline_hf):
    lines = sentences(50)
    data_file = write_rows(tmp_path / "lm1b.parquet", [{"text": t} for t in lines])
    vocab = write_bert_vocab(tmp_path / "bert", [lm1b_detokenizer(t) for t in lines])
    # The sample has one split; the preset's train/test become its first 40 and last 10 rows.
    cfg = paper_cfg("paper-lm1b", tmp_path, data_file, f"data.tokenizer_path={vocab}", "data.seq_len=16",
                    "data.hf_train_split=train[:40]", "data.hf_val_split=train[40:]")
    assert (cfg.tokenizer, cfg.packing, cfg.detokenizer) == ("bert-base-uncased", "wrap", "lm1b")
    data = prepare_data(cfg)
    assert (data.meta["n_train_docs"], data.meta["n_val_docs"]) == (40, 10)
    detok = [lm1b_detokenizer(t) for t in lines]
    assert "http://www." in " ".join(detok) and "It's \"the best" in " ".join(detok)
    for split, texts in (("train", detok[:40]), ("val", detok[40:])):
        assert np.array_equal(data.blocks(split), expected_blocks(data.tokenizer, texts, 16))
    assert data.tokenizer.eos_id == data.tokenizer.tok.token_to_id("[SEP]")


def test_openwebtext_streamed_with_mdlm_validation_as_the_last_documents(tmp_path, offline_hf):
    texts = bbc_texts(30)
    data_file = write_rows(tmp_path / "owt.parquet", [{"text": t} for t in texts])
    gpt2 = write_gpt2_files(tmp_path / "gpt2")
    # MDLM: validation = the last 100,000 training documents; here the last 6 of 30.
    cfg = paper_cfg("paper-owt", tmp_path, data_file, f"data.tokenizer_path={gpt2}", "data.seq_len=64",
                    "data.hf_train_split=train[:-6]", "data.hf_val_split=train[-6:]", "data.num_proc=2")
    assert (cfg.tokenizer, cfg.packing) == ("gpt2", "wrap")
    assert load_config("paper-owt").data.hf_val_split == "train[-100000:]"
    data = prepare_data(cfg)
    assert (data.meta["n_train_docs"], data.meta["n_val_docs"]) == (24, 6)
    assert np.array_equal(data.blocks("train"), expected_blocks(data.tokenizer, texts[:24], 64))
    assert np.array_equal(data.blocks("val"), expected_blocks(data.tokenizer, texts[24:], 64))


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_fineweb_edu_streamed_with_its_metadata_columns_split_by_document(tmp_path, offline_hf, suffix):
    texts = bbc_texts(40)
    rows = [{"text": t, "id": f"<urn:uuid:{i:08d}>", "dump": "CC-MAIN-2024-10", "url": f"https://example.org/{i}",
             "file_path": "s3://commoncrawl/x.warc.gz", "language": "en", "language_score": 0.97,
             "token_count": len(t.split()), "score": 3.1, "int_score": 3} for i, t in enumerate(texts)]
    data_file = write_rows(tmp_path / f"fineweb-edu{suffix}", rows)
    cfg = paper_cfg("paper-fineweb-edu", tmp_path, data_file, "data.tokenizer=bpe", "data.bpe_vocab_size=400",
                    "data.seq_len=64", "data.val_fraction=0.2")
    assert cfg.hf_val_split == ""  # no validation split: carved by document hash
    data = prepare_data(cfg)
    is_val = [_unit_hash(0, f"hf/train/{i}") < 0.2 for i in range(len(texts))]
    assert 0 < sum(is_val) < len(texts)
    assert (data.meta["n_train_docs"], data.meta["n_val_docs"]) == (is_val.count(False), sum(is_val))
    val_texts = [t for t, v in zip(texts, is_val) if v]
    assert np.array_equal(data.blocks("val"), expected_blocks(data.tokenizer, val_texts, 64))


def test_hf_bad_split_slice_and_column_are_one_line_errors(tmp_path, offline_hf):
    data_file = write_rows(tmp_path / "rows.parquet", [{"text": t} for t in sentences(5)])
    base = DataConfig(source="hf", hf_name="parquet", paths=[str(data_file)], cache_dir=str(tmp_path / "c"))
    from loopmdm.data.corpus import iter_documents

    with pytest.raises(LoopMDMError, match=r"split 'train\[-9:\]' selects no rows of 5"):
        list(iter_documents(base, "train[-9:]"))
    with pytest.raises(LoopMDMError, match="'content' is not a column.*available: text"):
        list(iter_documents(replace(base, hf_text_field="content")))
    with pytest.raises(LoopMDMError, match="tokenizer_path='/nowhere/gpt2' does not exist"):
        prepare_data(replace(base, tokenizer="gpt2", tokenizer_path="/nowhere/gpt2"))
    with pytest.raises(LoopMDMError, match="data.detokenizer='wt'"):
        load_config("tiny", ["data.detokenizer=wt"])


def test_a_stream_failing_midway_is_a_one_line_error(tmp_path, offline_hf, monkeypatch):
    import datasets

    data_file = write_rows(tmp_path / "rows.parquet", [{"text": t} for t in sentences(5)])
    base = DataConfig(source="hf", hf_name="parquet", paths=[str(data_file)], cache_dir=str(tmp_path / "c"))
    from loopmdm.data.corpus import iter_documents

    def broken(self, batch_size):
        yield {"text": ["first row"]}
        raise ConnectionError("Connection reset by peer\nmore detail")

    monkeypatch.setattr(datasets.IterableDataset, "iter", broken)
    docs = iter_documents(base)
    assert next(docs).text == "first row"
    with pytest.raises(LoopMDMError, match=r"failed after 1 rows: Connection reset by peer; run again to resume"):
        next(docs)


def test_a_worker_process_that_dies_is_a_one_line_error_not_a_hang(monkeypatch):
    """A worker killed mid-item (the OOM killer on a huge document) must stop the preparation
    with one line; multiprocessing.Pool replaced the worker and waited forever for its result."""
    import os
    import threading

    tokenizer = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    real = encode.encode_pieces

    def dies_on_a_marked_piece(tok, pieces):
        if "die" in pieces:
            os._exit(9)  # in the forked worker only: the parent never encodes with num_proc=2
        return real(tok, pieces)

    monkeypatch.setattr(encode, "encode_pieces", dies_on_a_marked_piece)
    items = [(i, ["a a", "die" if i == 3 else "a"]) for i in range(8)]
    outcome = []

    def consume():
        try:
            outcome.append(len(list(encode.encode_items(tokenizer, items, num_proc=2))))
        except Exception as exc:  # noqa: BLE001 -- the test inspects it
            outcome.append(exc)

    worker = threading.Thread(target=consume, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "encode_items hung after a worker process died"
    assert isinstance(outcome[0], LoopMDMError) and "worker process died" in str(outcome[0])
