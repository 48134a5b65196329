"""Zero-shot perplexity: the NELBO bound on corpora the model never trained on, per loop count.

MDLM's protocol (Sahoo et al. 2024, Table 3): each held-out set (data/zeroshot_sets.py) is
detokenized, encoded with the model's own tokenizer, wrapped into sequences of its training
length, and scored with the same estimator as validation (evaluation/nelbo.py: one antithetic t
per sequence, `draws` fresh (t, mask) draws each, paired across loop counts); PPL <= exp(NELBO
per token). Sequences are packed as the project packs training data (data/prepare.py
BlockWriter: each document + EOS, concatenated and cut, the incomplete tail dropped, as MDLM).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from loopmdm.data.loader import eval_rows
from loopmdm.data.prepare import BlockWriter
from loopmdm.data.zeroshot_sets import SETS, load_set
from loopmdm.devices import describe_machine
from loopmdm.diffusion.schedule import make_schedule
from loopmdm.errors import require
from loopmdm.evaluation.nelbo import evaluate_nelbo

ENCODE_CHUNK = 256  # documents per encode_batch call


def pack_documents(tokenizer, docs: list[str], seq_len: int, packing: str) -> np.ndarray:
    """(n_blocks, seq_len) int64 token ids of `docs`, packed by `BlockWriter` ('wrap' or 'pad')."""
    with tempfile.TemporaryDirectory(prefix="loopmdm-zeroshot-") as tmp:
        path = Path(tmp) / "set.bin"
        writer = BlockWriter(path, packing, seq_len, tokenizer.eos_id, tokenizer.pad_id, tokenizer.vocab_size,
                             np.dtype(np.int64))
        for start in range(0, len(docs), ENCODE_CHUNK):
            for ids in tokenizer.encode_batch(docs[start:start + ENCODE_CHUNK]):
                writer.add(ids)
        writer.close()
        return np.fromfile(path, dtype=np.int64).reshape(-1, seq_len)


def evaluate_zeroshot(run, sets: list[tuple[str, Optional[str]]], loops: list[int], *, cache_dir: str | Path,
                      max_docs: int = 0, packing: Optional[str] = None, batch_size: int = 64, num_batches: int = 0,
                      draws: int = 1, seed: int = 1234, precision: str = "fp32", progress: bool = False,
                      log: Callable[[str], None] = lambda _msg: None) -> dict:
    """NELBO / PPL bound of a loaded run (runs.load_run) on each (set, source) at each loop count.
    `num_batches` > 0 scores that many batches of sequences spread evenly over each set."""
    cfg, tok = run.cfg, run.tokenizer
    require(cfg.data.packing in ("wrap", "pad"),
            f"zero-shot perplexity needs a language model trained on text, not data.packing={cfg.data.packing}")
    require(max_docs >= 0 and num_batches >= 0, f"--max-docs {max_docs} and --batches {num_batches} must be >= 0")
    schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.eps)
    seq_len = cfg.data.seq_len
    report = {"run": str(run.run_dir), "step": run.step, "params": run.model.num_params(), "seq_len": seq_len,
              "tokenizer": cfg.data.tokenizer, "vocab_size": tok.vocab_size, "loops": list(loops), "draws": draws,
              "seed": seed, "batch_size": batch_size, "num_batches": num_batches, "max_docs": max_docs,
              "precision": precision, "machine": describe_machine(run.device), "sets": []}
    for name, source in sets:
        docs, where = load_set(name, source, cache_dir, max_docs)
        set_packing = packing or SETS[name].packing
        blocks = pack_documents(tok, docs, seq_len, set_packing)
        require(len(blocks) > 0, f"set '{name}' from {where}: {len(docs)} documents give less than one "
                                 f"sequence of {seq_len} tokens; give more text (or --packing pad)")
        log(f"{name}: {len(docs)} documents from {where} -> {len(blocks)} sequences of {seq_len} tokens ({set_packing})")
        results = evaluate_nelbo(run.model, blocks, schedule, loops, eps=cfg.diffusion.eps, batch_size=batch_size,
                                 num_batches=num_batches, draws=draws, seed=seed, pad_id=tok.pad_id,
                                 device=run.device, precision=precision, progress=progress)
        unigram = run.unigram_xent(blocks[eval_rows(len(blocks), batch_size, num_batches)])
        report["sets"].append({
            "set": name, "source": where, "description": SETS[name].description, "packing": set_packing,
            "docs": len(docs), "sequences": len(blocks), "scored_sequences": results[0]["sequences"],
            "tokens": results[0]["tokens"], "unigram_xent": unigram if math.isfinite(unigram) else None,
            "results": [{"loops": r["loops"], "nll": r["nll"], "ppl": r["ppl"]} for r in results]})
    return report


def markdown_table(report: dict) -> str:
    """Sets as rows, loop counts as columns: PPL bound (NELBO nats/token)."""
    loops = report["loops"]
    head = ["set", "docs", "scored tokens", "unigram PPL"] + [f"S = {s}" for s in loops]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in report["sets"]:
        by_s = {r["loops"]: r for r in entry["results"]}
        uni = entry["unigram_xent"]
        cells = [entry["set"], f"{entry['docs']:,}", f"{entry['tokens']:,}",
                 f"{math.exp(uni):.1f}" if uni is not None else "n/a"]
        cells += [f"{by_s[s]['ppl']:.1f} ({by_s[s]['nll']:.3f})" if s in by_s else "" for s in loops]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(report: dict) -> str:
    """The line under a table: what was measured, on what."""
    subset = (f"{report['max_docs']} documents spread evenly over each set" if report["max_docs"] else "every document")
    if report["num_batches"]:
        subset += f", {report['num_batches']} batches of {report['batch_size']} sequences spread evenly"
    return (f"Run `{report['run']}` (step {report['step']}, {report['params']:,} parameters, {report['tokenizer']} "
            f"tokenizer with {report['vocab_size']:,} ids, {report['seq_len']}-token sequences); {subset}; "
            f"PPL bound exp(NELBO) with NELBO in nats/token in brackets; {report['draws']} (t, mask) draw(s) per "
            f"sequence, seed {report['seed']}, {report['precision']}; machine: {report['machine']}.")
