"""Tokenizers: a byte-level BPE trained on the corpus, a character vocabulary read off the
corpus, GPT-2 BPE, or BERT WordPiece.

All four are `tokenizers.Tokenizer` objects behind one small wrapper. The diffusion
[MASK] id is `vocab_size`, one past the last real id, so it never collides with a token.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from loopmdm.config import DataConfig
from loopmdm.data.encode import iter_pieces
from loopmdm.errors import LoopMDMError, require

EOS_GPT = "<|endoftext|>"
PAD_GPT = "<|pad|>"
UNK_CHAR = "<|unk|>"  # a character that never occurs in the train split

# name -> (eos, pad, bos) special-token strings.
SPECIALS: Dict[str, tuple] = {
    "bpe": (EOS_GPT, PAD_GPT, None),
    "char": (EOS_GPT, PAD_GPT, None),
    "gpt2": (EOS_GPT, PAD_GPT, None),
    "bert-base-uncased": ("[SEP]", "[PAD]", "[CLS]"),
    "task": (EOS_GPT, PAD_GPT, None),
}


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the special ids the data pipeline and model need."""

    def __init__(self, tokenizer: Tokenizer, name: str):
        require(name in SPECIALS, f"unknown tokenizer '{name}'; choose one of: {', '.join(SPECIALS)}")
        self.tok = tokenizer
        self.name = name
        eos, pad, bos = SPECIALS[name]
        self.eos_id: int = self._special_id(eos)
        self.pad_id: int = self._special_id(pad)
        self.bos_id: Optional[int] = self._special_id(bos) if bos else None
        # Max id + 1 rather than a count, so the mask id is free even if ids have holes.
        self.vocab_size: int = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        # WordPiece pieces carry no spacing; byte-level BPE pieces do (see `decode`).
        self._spaced = isinstance(tokenizer.model, models.WordPiece)

    def _special_id(self, token: str) -> int:
        token_id = self.tok.token_to_id(token)
        require(token_id is not None, f"tokenizer '{self.name}' has no special token '{token}'")
        return token_id

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], mask_id: Optional[int] = None, mask_text: str = "_") -> str:
        """Text of `ids`; `mask_id` tokens shown as `mask_text`, pad dropped, EOS kept visible."""
        ids = [int(i) for i in ids if int(i) != self.pad_id]
        pieces: List[str] = []
        run: List[int] = []
        for i in ids + [None]:  # sentinel flushes the last run
            if i is not None and i != mask_id:
                run.append(i)
                continue
            if run:
                pieces.append(self.tok.decode(run, skip_special_tokens=False))
                run = []
            if i is not None:
                pieces.append(mask_text)
        return (" " if self._spaced else "").join(pieces)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.tok.to_str().encode("utf-8")).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))

    @classmethod
    def load(cls, path: str | Path, name: str) -> "TextTokenizer":
        return cls(_load_json(Path(path)), name)


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def _load_json(path: Path) -> Tokenizer:
    require(path.is_file(), f"tokenizer file '{path}' does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # invalid JSON or an unknown tokenizer format
        raise LoopMDMError(f"cannot load tokenizer file '{path}': {_first_line(exc)}") from None


# --- builders --------------------------------------------------------------------------

def _train_bpe(cfg: DataConfig, train_texts: Iterable[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.bpe_vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no unknowns
        special_tokens=[EOS_GPT, PAD_GPT],
        show_progress=False,
    )
    # Documents go in as pieces cut where the pre-tokenizer splits anyway (data/encode.py), so
    # the word counts, hence the merges, are the whole documents'; the trainer pre-tokenizes
    # each input at once, and a 50 MB line in one piece held ~5 GB.
    tok.train_from_iterator((piece for text in train_texts for piece in iter_pieces(text)), trainer=trainer)
    return tok


# Every character on its own (newlines included): one token per Unicode code point.
_ONE_CHAR = r"[\s\S]"


def _char_vocab(cfg: DataConfig, train_texts: Iterable[str]) -> Tokenizer:
    """Character level (nanoGPT's shakespeare_char): one id per character of the train split,
    in code-point order, then EOS, pad and unknown. A small vocabulary keeps the output head
    cheap, so a CPU affords the deep or looped trunk the experiment is about."""
    chars = set()
    for text in train_texts:
        chars.update(text)
    require(len(chars) > 0, "data.tokenizer=char found no characters in the train split")
    vocab = {ch: i for i, ch in enumerate(sorted(chars))}
    for special in (EOS_GPT, PAD_GPT, UNK_CHAR):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK_CHAR))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_ONE_CHAR), behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters are joined with nothing between them
    tok.add_special_tokens([EOS_GPT, PAD_GPT, UNK_CHAR])
    return tok


def _from_hub(name: str) -> Tokenizer:
    try:
        return Tokenizer.from_pretrained(name)
    except Exception:
        raise LoopMDMError(f"cannot download tokenizer '{name}' from the Hugging Face Hub (offline?); "
                           f"set data.tokenizer_path to a local copy") from None


def _gpt2(cfg: DataConfig) -> Tokenizer:
    path = Path(cfg.tokenizer_path).expanduser() if cfg.tokenizer_path else None
    if path is None:
        tok = _from_hub("gpt2")
    elif path.is_file():
        tok = _load_json(path)
    elif path.is_dir():
        vocab, merges = path / "vocab.json", path / "merges.txt"
        require(vocab.is_file() and merges.is_file(),
                f"data.tokenizer_path='{cfg.tokenizer_path}' must contain vocab.json and merges.txt "
                "(GPT-2 format) or be a tokenizer.json file")
        try:
            tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
        except Exception as exc:
            raise LoopMDMError(f"cannot read GPT-2 vocab/merges in '{path}': {_first_line(exc)}") from None
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    else:
        raise LoopMDMError(f"data.tokenizer_path='{cfg.tokenizer_path}' does not exist")
    require(tok.token_to_id(EOS_GPT) is not None,
            f"GPT-2 tokenizer at '{cfg.tokenizer_path or 'gpt2'}' has no '{EOS_GPT}' token")
    tok.add_special_tokens([EOS_GPT])  # matched whole in text, never split into bytes
    # GPT-2 has no pad token; a new special gets the next free id (50257 for real GPT-2).
    if tok.token_to_id(PAD_GPT) is None:
        tok.add_special_tokens([PAD_GPT])
    return tok


def _bert(cfg: DataConfig) -> Tokenizer:
    if not cfg.tokenizer_path:
        return _from_hub("bert-base-uncased")
    path = Path(cfg.tokenizer_path).expanduser()
    vocab = path / "vocab.txt" if path.is_dir() else path
    require(vocab.is_file(), f"data.tokenizer_path='{cfg.tokenizer_path}' must be a BERT vocab.txt "
                             "or a folder containing one")
    try:
        model = models.WordPiece.from_file(str(vocab), unk_token="[UNK]")
    except Exception as exc:
        raise LoopMDMError(f"cannot read BERT vocab '{vocab}': {_first_line(exc)}") from None
    tok = Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    specials = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if tok.token_to_id(t) is not None]
    for needed in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"):
        require(needed in specials, f"BERT vocab '{vocab}' lacks the special token '{needed}'")
    tok.add_special_tokens(specials)
    return tok


def task_tokenizer(symbols: List[str]) -> TextTokenizer:
    """A word-level tokenizer over a synthetic task's symbols (id = index), then EOS and pad."""
    vocab = {sym: i for i, sym in enumerate(symbols)}
    for special in (EOS_GPT, PAD_GPT):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=PAD_GPT))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([EOS_GPT, PAD_GPT])
    return TextTokenizer(tok, "task")


# Vocabulary sizes of the pretrained tokenizers (real tokens, as TextTokenizer counts them).
PRETRAINED_VOCAB = {"gpt2": 50258, "bert-base-uncased": 30522}


def expected_vocab_size(cfg: DataConfig) -> int:
    """The vocabulary the configured tokenizer will have, without preparing data (`loopmdm flops`)."""
    if cfg.tokenizer == "task" or cfg.source == "task":
        from loopmdm.tasks import get_task

        return len(get_task(cfg.task).symbols(cfg.task_size, cfg.task_hops)) + 2  # + EOS, pad
    if cfg.tokenizer == "bpe":
        return cfg.bpe_vocab_size
    if cfg.tokenizer == "char":  # the train split's characters: read them (seconds for the plays)
        from loopmdm.data.corpus import SplitCorpus

        chars = set()
        for doc in SplitCorpus(cfg).iter("train"):
            chars.update(doc.text)
        return len(chars) + 3  # + EOS, pad, unknown
    return PRETRAINED_VOCAB[cfg.tokenizer]


def build_tokenizer(cfg: DataConfig, train_texts: Iterable[str]) -> TextTokenizer:
    """The configured tokenizer; only `bpe` and `char` read `train_texts` (built from them)."""
    if cfg.tokenizer == "bpe":
        if cfg.tokenizer_path:  # reuse a trained one, e.g. a run's tokenizer.json to evaluate it on new text
            return TextTokenizer(_load_json(Path(cfg.tokenizer_path).expanduser()), "bpe")
        return TextTokenizer(_train_bpe(cfg, train_texts), "bpe")
    if cfg.tokenizer == "char":
        if cfg.tokenizer_path:
            return TextTokenizer(_load_json(Path(cfg.tokenizer_path).expanduser()), "char")
        return TextTokenizer(_char_vocab(cfg, train_texts), "char")
    if cfg.tokenizer == "gpt2":
        return TextTokenizer(_gpt2(cfg), "gpt2")
    if cfg.tokenizer == "bert-base-uncased":
        return TextTokenizer(_bert(cfg), "bert-base-uncased")
    # `task` is a synthetic task's own vocabulary, made by the task (prepare.py), never from text.
    text_tokenizers = [name for name in SPECIALS if name != "task"]
    raise LoopMDMError(f"data.tokenizer='{cfg.tokenizer}' cannot encode text (data.source={cfg.source}); "
                       f"choose one of: {', '.join(text_tokenizers)}")
