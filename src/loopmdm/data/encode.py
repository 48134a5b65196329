"""Tokenizing a document stream: long documents cut into bounded pieces, pieces encoded in
ordered batches, in worker processes when `num_proc > 1`.

Memory is flat in document size: a document is encoded as pieces of at most
`MAX_PIECE_CHARS` characters (one `encode` call on a 50 MB line held ~9 GB of encodings),
and the pieces' ids are handed on piece by piece. Output is identical for any `num_proc`:
work items are encoded independently and consumed in submission order.

Why cutting does not change the ids: a cut is made only where the tokenizer's
pre-tokenizer splits anyway. Byte-level BPE (GPT-2's regex, our trained BPE) and BERT's
pre-tokenizer both split before " word" (the space joins the word that follows it) and
after a lone "\n" that follows a non-space, and merges never cross pre-tokens. The ids can
differ only at a hard cut, made when a window of `MAX_PIECE_CHARS` has no such boundary
(a run of text without spaces or newlines, e.g. base64 or unspaced CJK).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Iterable, Iterator, List, Sequence, Tuple

import numpy as np
from tokenizers import Tokenizer

from loopmdm.errors import LoopMDMError

MAX_PIECE_CHARS = 1 << 16  # per encode input: bounds a worker's encoding memory (~200 B/char)
ITEM_CHARS = 1 << 17  # characters per work item sent to a worker (at most twice this)
ITEM_PIECES = 1024  # pieces per work item (short documents: LM1B sentences)


def default_num_proc() -> int:
    """Worker processes for `data.num_proc=0`: the usable cores, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def _cut_before(text: str, lo: int, hi: int) -> int:
    """The last index in (lo, hi] where the pre-tokenizer splits anyway, or -1.

    " word": cut before the space (GPT-2's " ?\\p{L}+" keeps the space with the word).
    "x\\nword": cut after the newline; only a lone newline, as a whitespace run at the end
    of a piece would be one pre-token but is split before its last character in context."""
    i = hi
    while i > lo:
        j = max(text.rfind(" ", lo, i), text.rfind("\n", lo, i))
        if j <= lo or j + 1 >= len(text):
            return -1
        if text[j + 1].isalnum():
            if text[j] == " ":
                return j
            if not text[j - 1].isspace():
                return j + 1
        i = j
    return -1


def split_text(text: str, max_chars: int = 0) -> List[str]:
    """`text` as consecutive pieces of at most `max_chars` (default MAX_PIECE_CHARS)
    characters, cut at pre-token boundaries (module docstring); ''.join(pieces) == text."""
    return list(iter_pieces(text, max_chars))


def iter_pieces(text: str, max_chars: int = 0) -> Iterator[str]:
    """`split_text`, one piece at a time: a consumer that drops each piece holds one piece's
    copy of the text, not the document's (training the BPE on a 50 MB line)."""
    max_chars = max_chars or MAX_PIECE_CHARS
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = _cut_before(text, start + max_chars // 2, end)
        if cut < 0:
            cut = end  # no boundary in the window: a hard cut (ids may differ at this seam)
        yield text[start:cut]
        start = cut
    yield text[start:] if start else text


# --- encoding, in this process or in workers -------------------------------------------

_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer_json: str) -> None:
    # One thread per worker: the processes are the parallelism (no oversubscription).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = Tokenizer.from_str(tokenizer_json)


def encode_pieces(tokenizer: Tokenizer, pieces: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """(ids of all pieces concatenated as uint32, ids per piece): one array to pickle, not lists."""
    encodings = tokenizer.encode_batch(list(pieces), add_special_tokens=False)
    arrays = [np.array(e.ids, dtype=np.uint32) for e in encodings]
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    return (np.concatenate(arrays) if arrays else np.empty(0, dtype=np.uint32)), lengths


def _encode_in_worker(pieces: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    return encode_pieces(_WORKER_TOKENIZER, pieces)


def _worker_pool(num_proc: int, tokenizer: Tokenizer) -> ProcessPoolExecutor:
    """fork where there is one (Linux): spawn would re-import the caller's main module, and a
    script without `if __name__ == "__main__"` would prepare again in each worker (waiting
    forever on the first one's lock). A forked child of the tokenizers library turns its
    threads off; TOKENIZERS_PARALLELISM set around the fork only keeps it from warning.
    An executor, not multiprocessing.Pool: a Pool replaces a worker that dies (the OOM
    killer) and leaves its task's result waiting forever; the executor raises BrokenProcessPool."""
    method = "fork" if sys.platform == "linux" else "spawn"
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context(method),
                                   initializer=_init_worker, initargs=(tokenizer.to_str(),))
        pool.submit(int).result()  # start the workers now, while the variable is set
        return pool
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def _result(future):
    try:
        return future.result()
    except BrokenProcessPool:
        raise LoopMDMError("a tokenizing worker process died (killed, e.g. out of memory?); rerun to resume "
                           "from the last checkpoint, with a smaller data.num_proc if memory is short") from None


def encode_items(tokenizer: Tokenizer, items: Iterable[Tuple[object, List[str]]],
                 num_proc: int) -> Iterator[Tuple[object, np.ndarray, np.ndarray]]:
    """(tag, flat ids, ids per piece) for each (tag, pieces) work item, in input order.

    num_proc=1 encodes here (the tokenizers library may use its own threads); more starts
    that many worker processes with at most 2 items each in flight, so reading the source
    never runs ahead of tokenizing (memory stays bounded)."""
    if num_proc <= 1:
        for tag, pieces in items:
            yield (tag, *encode_pieces(tokenizer, pieces))
        return
    pool = _worker_pool(num_proc, tokenizer)
    try:
        pending: deque = deque()
        for tag, pieces in items:
            pending.append((tag, pool.submit(_encode_in_worker, pieces)))
            if len(pending) >= 2 * num_proc:
                tag0, future = pending.popleft()
                yield (tag0, *_result(future))
        while pending:
            tag0, future = pending.popleft()
            yield (tag0, *_result(future))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
