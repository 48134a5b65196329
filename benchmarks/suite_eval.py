"""Time a suite's evaluation stage one run at a time against `--jobs` runs at once.

`loopmdm experiment` evaluates its final runs after training them (experiments/runner.py,
evaluate_runs). This copies the named finished runs of a suite folder into scratch folders
without their eval.json and evaluates them three ways, in one process on one machine:
one at a time (torch's default threads); `--jobs` at once in threads of this process with
torch's threads shared out (how evaluate_runs did it until 2026-12-08, re-implemented here as the
"before"); and `--jobs` at once through evaluate_runs (subprocesses, since 2026-12-08). It
prints each wall time, the speed-ups, and whether the numbers agree (to 1e-6: torch's thread
count changes the order of float32 sums).

    .venv/bin/python benchmarks/suite_eval.py results/shakespeare-char-cpu-knobs shakespeare-char cpu \
        --runs loop-s0,loop-lr-s0 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

from loopmdm.errors import require, run_script
from loopmdm.experiments.evaluate import evaluate_run
from loopmdm.experiments.runner import RunSpec, evaluate_runs
from loopmdm.experiments.suites import get_suite


def _specs(root: Path, names: list[str]) -> list[RunSpec]:
    specs = []
    for name in names:
        train = json.loads((root / name / "train_summary.json").read_text())
        arm, seed = name.rsplit("-s", 1)
        specs.append(RunSpec(name, arm, float(train.get("lr", 0.0)), int(seed), 0.0, root / name))
    return specs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("suite_dir", help="results/<suite>-<scale> holding runs/<arm>-s<seed>")
    p.add_argument("suite")
    p.add_argument("scale")
    p.add_argument("--runs", required=True, help="comma-separated run names under SUITE_DIR/runs")
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args()
    suite = get_suite(args.suite)
    require(args.scale in suite.scales, f"scale '{args.scale}' is not one of {', '.join(suite.scales)}")
    scale = suite.scales[args.scale]
    names = args.runs.split(",")
    for name in names:
        require((Path(args.suite_dir) / "runs" / name / "train_summary.json").is_file(),
                f"--runs: '{name}' is not a finished run under {args.suite_dir}/runs")
    def threads(specs):  # the previous evaluate_runs: `--jobs` threads in this process
        import os
        from concurrent.futures import ThreadPoolExecutor

        import torch

        default = torch.get_num_threads()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.jobs))
        try:
            with ThreadPoolExecutor(max_workers=args.jobs) as pool:
                done = list(pool.map(lambda spec: evaluate_run(suite, spec, scale, lambda m: None), specs))
        finally:
            torch.set_num_threads(default)
        return {spec.name: ev for spec, ev in zip(specs, done)}

    modes = {"one at a time": lambda specs: evaluate_runs(suite, specs, scale, 1, log=lambda m: None),
             f"{args.jobs} threads (before)": threads,
             f"{args.jobs} subprocesses (now)": lambda specs: evaluate_runs(suite, specs, scale, args.jobs,
                                                                           log=lambda m: None)}
    times, results = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for k, (mode, evaluate) in enumerate(modes.items()):
            root = Path(scratch) / f"mode{k}"
            for name in names:
                shutil.copytree(Path(args.suite_dir) / "runs" / name, root / name,
                                ignore=shutil.ignore_patterns("eval.json"))
            t0 = time.perf_counter()
            results[mode] = evaluate(_specs(root, names))
            times[mode] = time.perf_counter() - t0
            print(f"{mode}: {times[mode]:.1f} s", flush=True)
    first = next(iter(modes))
    for mode in modes:
        print(f"{len(names)} runs, {mode}: {times[mode]:.1f} s, speed-up {times[first] / times[mode]:.2f}x; "
              f"same numbers as one at a time (1e-6): {_close(results[first], results[mode])}")


def _close(a, b, rel: float = 1e-6) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)
    return a == b


if __name__ == "__main__":
    run_script(main)
