"""The package installed from its wheel, away from the source tree: presets are package data.

The wheel is built from a copy of the sources, installed with `pip install --no-deps --target
DIR`, and every command runs with DIR first on PYTHONPATH (this interpreter's site-packages
behind it for torch & co., the source tree not on the path) from an unrelated folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """(the install folder, the environment that puts it first)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src-copy"  # build from a copy: the wheel build writes build/ and *.egg-info
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = root / "wheels"
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                  str(src)])
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next(wheels.glob("loopmdm-*.whl"))
    target = root / "site"
    inst = _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)])
    assert inst.returncode == 0, inst.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(target), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return target, env


def _loopmdm(installed, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    target, env = installed
    script = target / "bin" / "loopmdm"
    cmd = [sys.executable, str(script)] if script.is_file() else [sys.executable, "-m", "loopmdm.cli"]
    result = _run([*cmd, *args], cwd=cwd, env=env)
    print(f"$ loopmdm {' '.join(args)}  -> exit {result.returncode}\n{result.stdout[-600:]}{result.stderr[-600:]}")
    return result


def test_the_wheel_works_from_any_directory(installed, tmp_path):
    target, env = installed
    assert (target / "loopmdm" / "configs" / "tiny.yaml").is_file()
    assert (target / "loopmdm" / "configs" / "experiments" / "khop.yaml").is_file()
    where = _run([sys.executable, "-c", "import loopmdm; print(loopmdm.__file__)"], cwd=tmp_path, env=env)
    assert where.stdout.strip().startswith(str(target)), where.stdout + where.stderr  # not the source tree

    flops = _loopmdm(installed, tmp_path, "flops", "tiny")
    assert flops.returncode == 0 and "vocab_size" in flops.stdout, flops.stderr
    suite_preset = _loopmdm(installed, tmp_path, "flops", "experiments/khop")  # a task tokenizer: no data needed
    assert suite_preset.returncode == 0 and "vocab_size" in suite_preset.stdout, suite_preset.stderr

    docs = tmp_path / "docs"  # a small corpus of one's own: BPE training on it takes no time
    docs.mkdir()
    for d in range(8):
        (docs / f"{d}.txt").write_text(" ".join(f"cat {i} sat on mat {d} and saw dog {i + d}." for i in range(60)))
    run = tmp_path / "runs" / "w"
    small = ["data.source=text", f"data.paths=['{docs}/*.txt']", "data.bpe_vocab_size=300", "data.seq_len=32",
             "data.val_fraction=0.2", "model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.cond_dim=16",
             "model.loop_start=1", "model.loop_end=2", "model.max_train_loops=2", "train.batch_size=2",
             "train.max_steps=2", "train.max_minutes=0", "train.warmup_steps=1", "train.precision=fp32",
             "train.device=cpu", "train.eval_every=0", "train.eval_batches=1", "train.checkpoint_every=2",
             "train.progress=false", f"train.out_dir={run}", "eval.batch_size=2", "eval.num_batches=1"]
    train = _loopmdm(installed, tmp_path, "train", "tiny", *small)
    assert train.returncode == 0, train.stderr[-2000:]
    # The data cache is the user's ($LOOPMDM_CACHE_DIR here: tests/conftest.py), not ./data_cache.
    assert not (tmp_path / "data_cache").exists()
    prepared = json.loads((run / "data.json").read_text())["prepared_path"]
    assert Path(prepared).parent == Path(env["LOOPMDM_CACHE_DIR"]), prepared
    ev = _loopmdm(installed, tmp_path, "eval", str(run), "--loops", "1,2", "--json")
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert '"loops": 2' in ev.stdout

    # The suite resolves its preset and plans its runs; --report-only then finds nothing trained
    # (a real --dry-run trains 15 runs: minutes, too slow for a unit test).
    exp = _loopmdm(installed, tmp_path, "experiment", "khop", "--dry-run", "--report-only", "--out", str(tmp_path / "exp"))
    assert exp.returncode == 2 and "nothing to report" in exp.stderr and "Traceback" not in exp.stderr, exp.stderr
