"""Time a suite's evaluation stage one run at a time against `--jobs` runs at once.

`loopmdm experiment` evaluates its final runs after training them (experiments/runner.py,
evaluate_runs). This copies the named finished runs of a suite folder into a scratch folder
without their eval.json, evaluates them with jobs = 1 (torch's default threads) and then with
jobs = N (threads, the cores shared out), checks the two give the same numbers, and prints the
wall times and their ratio.

    .venv/bin/python benchmarks/suite_eval.py results/shakespeare-char-cpu-knobs shakespeare-char cpu \
        --runs loop-s0,loop-lr-s0 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from loopmdm.errors import require, run_script
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
    times, results = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for jobs in (1, args.jobs):
            root = Path(scratch) / f"jobs{jobs}"
            for name in names:
                shutil.copytree(Path(args.suite_dir) / "runs" / name, root / name,
                                ignore=shutil.ignore_patterns("eval.json"))
            t0 = time.perf_counter()
            results[jobs] = evaluate_runs(suite, _specs(root, names), scale, jobs, log=lambda m: None)
            times[jobs] = time.perf_counter() - t0
            print(f"jobs = {jobs}: {times[jobs]:.1f} s", flush=True)
    same = all(json.dumps(results[1][n], sort_keys=True) == json.dumps(results[args.jobs][n], sort_keys=True)
               for n in names)
    print(f"{len(names)} runs: jobs = 1 {times[1]:.1f} s, jobs = {args.jobs} {times[args.jobs]:.1f} s, "
          f"speed-up {times[1] / times[args.jobs]:.2f}x; same numbers: {same}")


if __name__ == "__main__":
    run_script(main)
