"""Score a task suite's finished runs on a test split that no choice has seen.

Suites trained before tasks had test splits (e.g. `khop --scale cpu-deep`) chose their learning
rate on validation NELBO and report solve rates on validation examples. This prepares the same
task data with `data.test_fraction` (train and validation are unchanged: data/prepare.py draws
test examples from their own seed and drops any that occur in train or validation) and solves
the test examples with each run's final weights -- the weights the suite reported. Writes
SUITE_DIR/test_split_solve.json (every run, S and hop) and test_split_solve.md: per hop, the mean
± standard error over the seeds every arm has, and the paired differences within a seed
(LoopMDM at each S − the MDM; LoopMDM S − S = 1).

    PYTHONPATH=src python benchmarks/task_test_split.py results/khop-cpu-deep --fraction 0.00125 --num 500
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from loopmdm.data.prepare import prepare_data
from loopmdm.errors import require, run_script
from loopmdm.diffusion.schedule import make_schedule
from loopmdm.evaluation.nelbo import evaluate_nelbo
from loopmdm.evaluation.solve import solve_task, task_test_set
from loopmdm.experiments.tables import fmt, mean_se
from loopmdm.runfiles import write_text_atomic
from loopmdm.runs import load_run


def _scores(record: dict) -> list[float]:
    """Per-hop accuracy of one solve record (a task without hops: its solve rate)."""
    return list(record.get("per_hop", [record.get("solved", record.get("acc", 0.0))]))


def per_hop_markdown(out: dict) -> str:
    """Tables of `out["runs"]` ({'<arm>-s<seed>': [solve record per S]}): mean ± standard error
    over the seeds present for every arm, then paired differences within each of those seeds."""
    by_arm: dict = {}
    for name, records in out["runs"].items():
        arm, seed = name.rsplit("-s", 1)
        by_arm.setdefault(arm, {})[int(seed)] = {r["loops"]: _scores(r) for r in records}
    seeds = sorted(set.intersection(*(set(d) for d in by_arm.values())))
    require(seeds, "no seed is present for every arm: nothing to pair")
    hops = len(_scores(next(iter(out["runs"].values()))[0]))
    by_arm = dict(sorted(by_arm.items(), key=lambda item: item[0] != "mdm"))  # the MDM's row first
    head = "| " + " | ".join(f"hop {h + 1}" for h in range(hops)) + " |"
    rule = "|---|" + "---|" * hops
    lines = [f"Test split, {out['order']} order, {out['num']} examples; seeds {seeds} in every cell "
             "(mean ± standard error over seeds).", "", "| arm, S " + head, rule]
    cell = lambda values: fmt(*mean_se(values))  # noqa: E731
    for arm, runs in by_arm.items():
        for s in sorted(runs[seeds[0]]):
            lines.append(f"| {arm}, S = {s} | " + " | ".join(cell([runs[k][s][h] for k in seeds]) for h in range(hops)) + " |")
    mdm = by_arm.get("mdm")
    for arm, runs in by_arm.items():
        if arm == "mdm" or len(runs[seeds[0]]) < 2:
            continue
        lines += ["", f"Paired within a seed ({arm}): mean ± standard error of the differences", "", "| difference " + head, rule]
        for s in sorted(runs[seeds[0]]):
            if mdm is not None:
                lines.append(f"| {arm} S = {s} − mdm | " + " | ".join(
                    fmt(*mean_se([runs[k][s][h] - mdm[k][1][h] for k in seeds]), sign=True) for h in range(hops)) + " |")
        first = min(runs[seeds[0]])
        for s in sorted(runs[seeds[0]])[1:]:
            lines.append(f"| {arm} S = {s} − S = {first} | " + " | ".join(
                fmt(*mean_se([runs[k][s][h] - runs[k][first][h] for k in seeds]), sign=True) for h in range(hops)) + " |")
    if out.get("test_nelbo"):  # --nelbo: per run, each S (nats per answer token, the prompt given)
        lines += ["", "Test NELBO per run (nats per answer token; 8 batches, the same draws at every S):", "",
                  "| run | " + " | ".join(f"S = {k}" for k in sorted({int(k) for d in out["test_nelbo"].values() for k in d})) + " |"]
        every = sorted({int(k) for d in out["test_nelbo"].values() for k in d})
        lines.append("|---|" + "---|" * len(every))
        for name, by_s in sorted(out["test_nelbo"].items()):
            lines.append(f"| {name} | " + " | ".join(f"{by_s[str(k)]:.4f}" if str(k) in by_s else "" for k in every) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("suite_dir", help="results/<suite>-<scale> holding runs/<arm>-s<seed>")
    p.add_argument("--fraction", type=float, default=0.0, help="data.test_fraction (of task_examples); required "
                                                               "unless --table-only")
    p.add_argument("--num", type=int, default=500, help="test examples")
    p.add_argument("--loops", default="1,2,4,8,12,16")
    p.add_argument("--order", default="oneshot")
    p.add_argument("--nelbo", action="store_true",
                   help="also the test NELBO at each S (answers only, the prompt given; 8 batches, the same draws at "
                        "every S): the held-out counterpart of the suite's validation NELBO")
    p.add_argument("--table-only", action="store_true", help="solve nothing: remake test_split_solve.md from the json")
    args = p.parse_args()
    path = Path(args.suite_dir) / "test_split_solve.json"
    if args.table_only:
        require(path.is_file(), f"--table-only: {path} does not exist; run without --table-only first")
        write_text_atomic(path.with_suffix(".md"), per_hop_markdown(json.loads(path.read_text())))
        print(f"wrote {path.with_suffix('.md')}")
        return
    require(0 < args.fraction < 1, f"--fraction {args.fraction} must be in (0, 1): the test share of task_examples")
    torch.set_num_threads(1)
    loops = [int(s) for s in args.loops.split(",")]
    out = {"fraction": args.fraction, "num": args.num, "order": args.order, "runs": {}}
    for run_dir in sorted(Path(args.suite_dir, "runs").glob("*-s[0-9]*")):
        if not (run_dir / "train_summary.json").is_file() or run_dir.name.startswith("sweep-"):
            continue
        run = load_run(run_dir, device="cpu")
        data = prepare_data(dataclasses.replace(run.cfg.data, test_fraction=args.fraction))
        require(data.has_split("test"), f"--fraction {args.fraction} leaves no test examples for {run_dir}")
        test = task_test_set(data, args.num, seed=0, split="test")
        records = solve_task(run.model, data, test, loops if run.model.is_looped else [1], args.order, run.device)
        out["runs"][run_dir.name] = records
        if args.nelbo:
            cfg = run.cfg
            nelbo = evaluate_nelbo(run.model, data.blocks("test"), make_schedule(cfg.diffusion.schedule, cfg.diffusion.eps),
                                   loops if run.model.is_looped else [1], eps=cfg.diffusion.eps,
                                   batch_size=cfg.eval.batch_size, num_batches=8, seed=cfg.eval.seed,
                                   prompt_len=data.prompt_len, prompt_sep_id=data.prompt_sep_id, device=run.device)
            out.setdefault("test_nelbo", {})[run_dir.name] = {r["loops"]: r["nll"] for r in nelbo}
            print(run_dir.name, "test NELBO", {k: round(v, 4) for k, v in out["test_nelbo"][run_dir.name].items()})
        print(run_dir.name, [(r["loops"], [round(h, 3) for h in r.get("per_hop", [r.get("solved", 0.0)])]) for r in records])
    write_text_atomic(path, json.dumps(out, indent=1) + "\n")
    table = per_hop_markdown(out)
    write_text_atomic(path.with_suffix(".md"), table)
    print(table + f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    run_script(main)
