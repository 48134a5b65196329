"""Data preparation throughput against the tokenizer alone, and peak memory on one long line.

    PYTHONPATH=src python benchmarks/prepare_throughput.py [--mb 50] [--tokenizer-path tokenizers/gpt2]
    PYTHONPATH=src python benchmarks/prepare_throughput.py --check-pieces \
        --tokenizer-path tokenizers/gpt2 --bert-path tokenizers/bert-base-uncased
    PYTHONPATH=src python benchmarks/prepare_throughput.py --trained-bpe-lines 0.5,5,50

Builds a ~MB-megabyte corpus by repeating the embedded corpus (Shakespeare + BBC, one
document per file, each copy a distinct file), then, each in a fresh child process (so
peak RSS is per phase) and one after another in this one run:
  1. the tokenizer alone: `TextTokenizer.encode_batch` over the same documents, already in
     memory, 256 per call (the tokenizers library's own threads on);
  2. `prepare_data` with data.num_proc=1 (encoding in the main process, library threads on);
  3. `prepare_data` with data.num_proc=2 (two worker processes, one thread each);
  4. `prepare_data` on one single-line file of the same size (num_proc=2), and for scale
     one `encode` call on a 1/10 slice of that line (what preparation did before pieces;
     the whole line in one call needs ~9 GB).
Reports documents/s, tokens/s, peak RSS (the phase's process plus, for workers, the
largest worker) and the ratio of each preparation's time to the tokenizer's alone.
The GPT-2 vocabulary comes from --tokenizer-path (`make tokenizers`); without it a
byte-level BPE (vocab 8,192) is trained on 5 MB of the corpus first.

`--trained-bpe-lines MB,MB,...` measures instead the project's own BPE (`data.tokenizer=bpe`,
trained here, vocab 2,048 as in `tiny`): for each size, `prepare_data` with data.num_proc=1 on
one single-line file of that size (plus a short second document, so that the line can be the
train split), in a fresh process: training the tokenizer on the line, then encoding it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from loopmdm.config import DataConfig
from loopmdm.data.corpus import _embedded_files, read_text_file


def peak_rss_mb() -> tuple[float, float]:
    """(this process, its largest finished child) peak resident set, MB (Linux: ru_maxrss in kB)."""
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) and its finished children
    (the workers): unlike wall time, barely affected by other jobs on a shared machine."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def tokenizer_alone(cfg: DataConfig, corpus: Path, out) -> None:
    from loopmdm.data.tokenizer import build_tokenizer

    tok = build_tokenizer(cfg, [])
    texts = [read_text_file(p) for p in sorted(corpus.glob("*.txt"))]
    start, cpu = time.perf_counter(), cpu_seconds()
    n_tokens = 0
    for i in range(0, len(texts), 256):
        n_tokens += sum(map(len, tok.encode_batch(texts[i:i + 256])))
    out.put({"seconds": time.perf_counter() - start, "cpu": cpu_seconds() - cpu, "docs": len(texts),
             "tokens": n_tokens, "rss": peak_rss_mb()})


def prepare(cfg: DataConfig, out) -> None:
    from loopmdm.data.prepare import prepare_data

    start, cpu = time.perf_counter(), cpu_seconds()
    data = prepare_data(cfg)
    seconds = time.perf_counter() - start
    meta = data.meta
    out.put({"seconds": seconds, "cpu": cpu_seconds() - cpu, "docs": meta["n_train_docs"] + meta["n_val_docs"],
             "tokens": meta["n_train_tokens"] + meta["n_val_tokens"], "rss": peak_rss_mb()})


def one_call(cfg: DataConfig, line_file: Path, chars: int, out) -> None:
    from loopmdm.data.tokenizer import build_tokenizer

    tok = build_tokenizer(cfg, [])
    text = line_file.read_text(encoding="utf-8")[:chars]
    start, cpu = time.perf_counter(), cpu_seconds()
    n_tokens = len(tok.encode(text))
    out.put({"seconds": time.perf_counter() - start, "cpu": cpu_seconds() - cpu, "docs": 1, "tokens": n_tokens, "rss": peak_rss_mb()})


def check_pieces(paths: dict, texts: list[str], max_chars: int = 300) -> None:
    """Every embedded document encoded whole and as pieces of at most `max_chars`
    characters (many more cuts than the real 65,536): the ids must be identical."""
    from loopmdm.data.encode import split_text
    from loopmdm.data.tokenizer import build_tokenizer

    for name, path in paths.items():
        tok = build_tokenizer(DataConfig(tokenizer=name, tokenizer_path=path), [])
        cuts = differ = 0
        for text in texts:
            pieces = split_text(text, max_chars)
            cuts += len(pieces) - 1
            differ += tok.encode(text) != [i for ids in tok.encode_batch(pieces) for i in ids]
        print(f"pieces check, {name}: {len(texts)} documents, {cuts:,} cuts, {differ} documents with different ids")


def single_line_file(folder: Path, texts: list[str], mb: float) -> Path:
    """One line of about `mb` MB: the embedded corpus, whitespace collapsed, repeated."""
    one = " ".join(" ".join(t.split()) for t in texts) + " "
    size = int(mb * 1e6)
    path = folder / f"line_{mb:g}mb.txt"
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(size // len(one)):
            f.write(one)
        f.write(one[: size % len(one)])
    return path


def trained_bpe_lines(sizes_mb: list[float], texts: list[str], work: Path) -> None:
    """Peak RSS of preparing one long line with the BPE trained on it (module docstring)."""
    from loopmdm.data.corpus import split_names

    second = work / "second.txt"
    second.write_text(texts[0], encoding="utf-8")
    print("| single line | wall s | CPU s | tokens | peak RSS MB |")
    print("|---|---|---|---|---|")
    for mb in sizes_mb:
        line = single_line_file(work, texts, mb)
        paths = [str(line), str(second)]
        # The seed that puts the line in train, so that the tokenizer is trained on it.
        seed = next(s for s in range(100) if split_names(paths, 0.5, 0.0, s)[0] == "train")
        cfg = DataConfig(source="text", paths=paths, tokenizer="bpe", bpe_vocab_size=2048, seq_len=128,
                         val_fraction=0.5, split_seed=seed, num_proc=1, cache_dir=str(work / "cache"))
        r = run_phase(prepare, cfg)
        print(f"| {line.stat().st_size / 1e6:g} MB | {r['seconds']:.1f} | {r['cpu']:.1f} | {r['tokens']:,} "
              f"| {r['rss'][0]:,.0f} |", flush=True)
        shutil.rmtree(work / "cache", ignore_errors=True)
        line.unlink()


def run_phase(target, *args) -> dict:
    """`target` in a fresh spawned process (own peak RSS), its result dict."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    proc = context.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=50.0, help="corpus size in MB (default 50)")
    parser.add_argument("--tokenizer-path", default="", help="a GPT-2 folder (vocab.json + merges.txt)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the three main phases")
    parser.add_argument("--bert-path", default="", help="with --check-pieces: a bert-base-uncased vocab folder")
    parser.add_argument("--check-pieces", action="store_true",
                        help="only check that piece-wise encoding gives the whole documents' ids (real GPT-2/BERT)")
    parser.add_argument("--trained-bpe-lines", default="",
                        help="only measure the trained BPE on single lines of these sizes, MB (e.g. 0.5,5,50)")
    parser.add_argument("--work", default="", help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args()
    if args.check_pieces:
        paths = {"gpt2": args.tokenizer_path, "bert-base-uncased": args.bert_path}
        check_pieces({k: v for k, v in paths.items() if v}, [read_text_file(p) for _, p in _embedded_files()])
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="loopmdm-prep-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        texts = [read_text_file(p) for _, p in _embedded_files()]
        if args.trained_bpe_lines:
            print(f"{os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
            trained_bpe_lines([float(mb) for mb in args.trained_bpe_lines.split(",")], texts, work)
            return
        corpus_mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        copies = max(1, round(args.mb / corpus_mb))
        corpus = work / "corpus"
        corpus.mkdir(exist_ok=True)
        for c in range(copies):
            for i, text in enumerate(texts):
                (corpus / f"{c:02d}_{i:05d}.txt").write_text(text, encoding="utf-8")
        line_file = work / "line" / "one_line.txt"
        line_file.parent.mkdir(exist_ok=True)
        with open(line_file, "w", encoding="utf-8") as f:
            for c in range(copies):
                f.write(" ".join(" ".join(t.split()) for t in texts) + " ")
        size_mb = sum(p.stat().st_size for p in corpus.glob("*.txt")) / 1e6
        if args.tokenizer_path:
            tok_cfg = dict(tokenizer="gpt2", tokenizer_path=args.tokenizer_path)
        else:
            from loopmdm.data.tokenizer import build_tokenizer

            sample = texts[: len(texts) // 2]
            bpe = build_tokenizer(DataConfig(bpe_vocab_size=8192), sample)
            bpe.save(work / "bpe.json")
            tok_cfg = dict(tokenizer="bpe", tokenizer_path=str(work / "bpe.json"))
        base = DataConfig(source="text", paths=[str(corpus / "*.txt")], seq_len=1024, packing="wrap", **tok_cfg)

        def cfg(**kw) -> DataConfig:
            return DataConfig(**{**base.__dict__, **kw})

        # Rounds interleave the three phases, so a change in the machine's load hits all of them.
        phases = {"tokenizer alone (encode_batch, library threads)": lambda: run_phase(tokenizer_alone, base, corpus)}
        for n in (1, 2):
            phases[f"prepare, data.num_proc={n}"] = lambda n=n: run_phase(prepare, cfg(num_proc=n, cache_dir=str(work / "cache")))
        runs = {name: [] for name in phases}
        for _ in range(args.rounds):
            for name, phase in phases.items():
                shutil.rmtree(work / "cache", ignore_errors=True)
                runs[name].append(phase())
        # Least-disturbed round of each phase (minimum wall time); CPU seconds from the same round.
        rows = [(name, min(results, key=lambda r: r["seconds"])) for name, results in runs.items()]
        shutil.rmtree(work / "cache", ignore_errors=True)
        # One document cannot be split into train and validation: add a small second one.
        (line_file.parent / "second.txt").write_text(texts[0], encoding="utf-8")
        line_cfg = cfg(paths=[str(line_file), str(line_file.parent / "second.txt")], num_proc=2,
                       cache_dir=str(work / "cache"), val_fraction=0.5)
        line_mb = line_file.stat().st_size / 1e6
        rows.append((f"prepare one {line_mb:.0f} MB line, data.num_proc=2", run_phase(prepare, line_cfg)))
        tenth = line_file.stat().st_size // 10
        rows.append((f"one encode call on {tenth / 1e6:.0f} MB of that line (before pieces)",
                     run_phase(one_call, base, line_file, tenth)))

        print(f"corpus: {copies} copies of the embedded corpus = {len(texts) * copies} documents, {size_mb:.1f} MB; "
              f"tokenizer {tok_cfg['tokenizer']} ({tok_cfg['tokenizer_path']}); seq_len 1024, wrap; "
              f"{os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        alone, alone_cpu = rows[0][1]["seconds"], rows[0][1]["cpu"]
        print(f"rounds: {args.rounds} (best wall time of each phase shown)")
        print("| phase | wall s | CPU s | docs/s | tokens/s | peak RSS MB (process / largest child) "
              "| wall / tokenizer alone | CPU / tokenizer alone |")
        print("|---|---|---|---|---|---|---|---|")
        for name, r in rows:
            ratios = (f"{r['seconds'] / alone:.2f}x | {r['cpu'] / alone_cpu:.2f}x" if name.startswith("prepare, ")
                      else " | ")
            print(f"| {name} | {r['seconds']:.1f} | {r['cpu']:.1f} | {r['docs'] / r['seconds']:,.0f} "
                  f"| {r['tokens'] / r['seconds']:,.0f} | {r['rss'][0]:,.0f} / {r['rss'][1]:,.0f} | {ratios} |")
        print(json.dumps(runs), file=sys.stderr)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
