"""The experiment suites of `loopmdm experiment`: which arms, which budgets, what to measure.

Every arm of a suite trains from the suite's base config (configs/experiments/<suite>.yaml
or a preset) to the same total training FLOPs, with the same seeds (so the same data order
and evaluation draws), at its own best learning rate from a sweep at a smaller budget.
Arms (docs/RESULTS.md):
* ``mdm``       -- the plain MDM: the same layers, no loop.
* ``loop``      -- LoopMDM, the paper's recipe: the base config's early-middle loop block,
                   pure recurrence, S ~ U{1..S_max}, loss at the last loop.
* ``deeper``    -- a non-looped MDM whose per-step FLOPs equal LoopMDM's expected per-step
                   FLOPs (n_layers + (E[S] - 1) * loop layers, rounded).
* ``uniform``   -- the whole stack looped (Universal-Transformer style), S_max chosen so its
                   expected per-step FLOPs are closest to LoopMDM's.
* ``inject``    -- LoopMDM + input injection (ablation, ours).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loopmdm.config import Config, load_config
from loopmdm.errors import require


@dataclass(frozen=True)
class Scale:
    budget_flops: float  # training FLOPs of every final run
    sweep_fraction: float  # sweep runs train to this fraction of the budget
    lrs: tuple  # learning rates of the sweep
    seeds: tuple  # seeds of the final runs
    num_test: int  # test examples (tasks) / eval batches (lm)


@dataclass(frozen=True)
class Suite:
    name: str
    config: str  # preset name or YAML path of the base config
    arms: tuple
    kind: str  # "task" (solve accuracy) or "lm" (NELBO against FLOPs)
    scales: dict = field(default_factory=dict)
    orders: tuple = ()  # decoding orders for task suites
    loops: tuple = (1, 2, 4, 8, 12, 16)  # inference loop counts evaluated


ALL_ARMS = ("mdm", "loop", "deeper", "uniform", "inject")

SUITES = {
    "khop": Suite("khop", "configs/experiments/khop.yaml", ALL_ARMS, "task",
                  {"cpu": Scale(1.2e13, 0.3, (3e-4, 1e-3, 3e-3), (0, 1), 500),
                   "gpu": Scale(4e15, 0.25, (3e-4, 1e-3, 3e-3), (0, 1), 2000)},
                  orders=("oneshot",)),
    "sudoku": Suite("sudoku", "configs/experiments/sudoku.yaml", ALL_ARMS, "task",
                    {"cpu": Scale(2.4e13, 0.2, (1e-3, 3e-3, 1e-2), (0, 1), 300),
                     "gpu": Scale(4e15, 0.25, (3e-4, 1e-3, 3e-3), (0, 1), 1000)},
                    orders=("raster", "confidence", "oneshot")),
    "lm": Suite("lm", "tiny", ALL_ARMS, "lm",
                {"cpu": Scale(1.0e14, 0.3, (3e-4, 1e-3, 3e-3), (0, 1), 8),
                 "gpu": Scale(2e16, 0.25, (3e-4, 1e-3, 3e-3), (0, 1), 32)},
                loops=(1, 2, 4, 6, 8, 12, 16, 24)),
}


def get_suite(name: str) -> Suite:
    require(name in SUITES, f"suite '{name}' is not allowed; choose one of: {', '.join(SUITES)}")
    return SUITES[name]


def layer_passes(cfg: Config, expected: bool = True) -> float:
    """Layer passes per forward at E[S] (the paper's F_base + (E[S]-1) * n_loop * F_layer)."""
    m = cfg.model
    if not m.is_looped:
        return float(m.n_layers)
    mean_s = (m.max_train_loops + 1) / 2
    return m.n_layers + (mean_s - 1) * m.n_loop_layers


def arm_overrides(suite: Suite, arm: str) -> list[str]:
    """Config overrides that turn the suite's base config into `arm`."""
    require(arm in suite.arms, f"arm '{arm}' is not in suite '{suite.name}'; choose from: {', '.join(suite.arms)}")
    base = load_config(suite.config)
    m = base.model
    require(m.is_looped, f"the base config of suite '{suite.name}' must define the loop (model.loop_start/loop_end)")
    target = layer_passes(base)
    if arm == "loop":
        return []
    if arm == "inject":
        return ["model.input_injection=true"]
    if arm == "mdm":
        return ["model.loop_start=null", "model.loop_end=null"]
    if arm == "deeper":
        return ["model.loop_start=null", "model.loop_end=null", f"model.n_layers={int(round(target))}"]
    # uniform: loop all layers; pick S_max whose expected passes n * (S_max + 1) / 2 is closest
    best = min(range(1, 4 * m.max_train_loops + 1), key=lambda s: abs(m.n_layers * (s + 1) / 2 - target))
    return ["model.loop_start=0", f"model.loop_end={m.n_layers}", f"model.max_train_loops={best}"]
