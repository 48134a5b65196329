"""Score a task suite's finished runs on a test split that no choice has seen.

Suites trained before tasks had test splits (e.g. `khop --scale cpu-deep`) chose their learning
rate on validation NELBO and report solve rates on validation examples. This prepares the same
task data with `data.test_fraction` (train and validation are unchanged: data/prepare.py draws
test examples from their own seed and drops any that occur in train or validation) and solves
the test examples with each run's final weights -- the weights the suite reported.

    PYTHONPATH=src python benchmarks/task_test_split.py results/khop-cpu-deep --fraction 0.00125 --num 500
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from loopmdm.data.prepare import prepare_data
from loopmdm.evaluation.solve import solve_task, task_test_set
from loopmdm.runs import load_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("suite_dir", help="results/<suite>-<scale> holding runs/<arm>-s<seed>")
    p.add_argument("--fraction", type=float, required=True, help="data.test_fraction (of task_examples)")
    p.add_argument("--num", type=int, default=500, help="test examples")
    p.add_argument("--loops", default="1,2,4,8,12,16")
    p.add_argument("--order", default="oneshot")
    args = p.parse_args()
    torch.set_num_threads(1)
    loops = [int(s) for s in args.loops.split(",")]
    out = {"fraction": args.fraction, "num": args.num, "order": args.order, "runs": {}}
    for run_dir in sorted(Path(args.suite_dir, "runs").glob("*-s[0-9]*")):
        if not (run_dir / "train_summary.json").is_file() or run_dir.name.startswith("sweep-"):
            continue
        run = load_run(run_dir, device="cpu")
        data = prepare_data(dataclasses.replace(run.cfg.data, test_fraction=args.fraction))
        assert data.has_split("test")
        test = task_test_set(data, args.num, seed=0, split="test")
        records = solve_task(run.model, data, test, loops if run.model.is_looped else [1], args.order, run.device)
        out["runs"][run_dir.name] = records
        print(run_dir.name, [(r["loops"], [round(h, 3) for h in r.get("per_hop", [r.get("solved", 0.0)])]) for r in records])
    path = Path(args.suite_dir) / "test_split_solve.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
