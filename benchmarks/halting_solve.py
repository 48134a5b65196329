"""Adaptive halting where the loop matters: quality against mean loops on a task (issue 19).

A task LoopMDM (Sudoku) decodes the same test puzzles one blank per call (raster order by
default) at each fixed S, with each halting rule at each threshold (capped at S_max, each row
halting on its own), with the training-free oracle (the fewest loops that already give S_max's
token: the ceiling of any rule at equal quality), and optionally an MDM. It reports the solve
rate against mean loops per row-call with the paired s.e. against fixed S_max, the saving at
equal quality per rule with a bootstrap band, loops per call against t and as a histogram,
and per-token halting's wall time against its FLOPs (evaluation/halting_bench.py,
halting_stats.py, halting_report.py). Writes DIR/halting_solve.{json,md}, DIR/calls.npz (every
row-call) and DIR/quality_vs_loops.png, DIR/loops_vs_masked.png:

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/halting_solve.py \\
        results/sudoku-scarce-cpu/runs/loop-s0 --mdm results/sudoku-scarce-cpu/runs/mdm-s0 \\
        --num 300 --out results/halting-sudoku-cpu/loop-s0
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from loopmdm.errors import require, run_script
from loopmdm.evaluation import halting_bench as hb
from loopmdm.evaluation.halting_report import markdown, plot_loops_vs_masked, plot_quality
from loopmdm.evaluation.solve import scoring_of, task_test_set
from loopmdm.sampling.infill import ORDERS
from loopmdm.userfiles import check_out_dir, write_file

DEFAULT_RULES = ("change-scaled:0.005,0.01,0.02,0.05;change-masked:0.01,0.02,0.05,0.1;"
                 "kl:1e-4,1e-3,1e-2;flips:0.02,0.05,0.1")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="the LoopMDM task run directory")
    p.add_argument("--mdm", default="", help="an MDM run on the same task: one row, 1 call per step, no loop")
    p.add_argument("--out", required=True, help="folder for halting_solve.{json,md}, calls.npz and the plots")
    p.add_argument("--num", type=int, default=300, help="test puzzles (the same for every row)")
    p.add_argument("--seed", type=int, default=0, help="seed of the puzzles' blanks")
    p.add_argument("--order", default="raster", choices=ORDERS, help="decoding order (sampling/infill.py)")
    p.add_argument("--timing-repeats", type=int, default=3, help="per-token halting timing: runs of each arm "
                                                                 "(0: skip)")
    p.add_argument("--batch-size", type=int, default=256)
    hb.add_halting_options(p, DEFAULT_RULES, "puzzle")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(args.threads, 1))
    out = check_out_dir(args.out, "--out")
    loops = hb.parse_loops(args.loops)
    rules = hb.parse_rule_taus(args.rules)
    notes: list[str] = []
    started = time.perf_counter()

    run, weights, mdm_model, mdm_weights = hb.open_loop_and_mdm(args.run, args.mdm, args.device, notes)
    model = run.model
    data = run.prepared_data()
    split = "test" if data.has_split("test") else "val"
    if split == "val":
        notes.append("the run's data has no test split; the puzzles come from the validation split")
    test = task_test_set(data, args.num, seed=args.seed, split=split)
    s_max = args.s_max or model.cfg.max_train_loops
    setup = hb.Setup(test=test, mask_id=data.vocab_size, order=args.order, s_max=s_max,
                     num_symbols=scoring_of(test["task"]).answer_symbols(data.meta),
                     batch_size=args.batch_size, device=run.device)
    print(f"{len(test['x'])} {test['task']} puzzles ({split} split), {args.order} order, S_max = {s_max}")

    result = hb.benchmark(setup, model, loops, rules, args.granularity, mdm_model=mdm_model,
                          timing_repeats=args.timing_repeats, resamples=args.resamples)
    result.update(
        task=test["task"], n=len(test["x"]), split=split, weights=weights, mdm_weights=mdm_weights, notes=notes + result["notes"],
        settings={"run": args.run, "mdm": args.mdm or None, "num": args.num, "seed": args.seed, "order": args.order,
                  "s_max": s_max, "loops": loops, "rules": [[r, t] for r, t in rules],
                  "granularity": args.granularity, "timing_repeats": args.timing_repeats,
                  "resamples": args.resamples, "batch_size": args.batch_size, "device": str(run.device),
                  "threads": torch.get_num_threads()},
        machine=f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}, "
                f"{torch.cuda.get_device_name() if run.device.type == 'cuda' else f'{torch.get_num_threads()} thread(s)'}",
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        command=" ".join(shlex.quote(a) for a in ["benchmarks/halting_solve.py", *(sys.argv[1:] if argv is None else argv)]),
        seconds=time.perf_counter() - started)
    write_outputs(result, out)
    print(f"wrote {out}/halting_solve.json, .md, calls.npz, quality_vs_loops.png, loops_vs_masked.png "
          f"({result['seconds']:.0f} s)")
    return 0


def write_outputs(result: dict, out: Path) -> None:
    """The rows' raw per-call logs go to calls.npz (compact); the JSON keeps everything else."""
    arrays = {}
    for i, row in enumerate(result["rows"]):
        for key, values in row.pop("calls").items():
            arrays[f"{i}:{row['label']}:{key}"] = np.asarray(values)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_file(out / "calls.npz", buf.getvalue())
    write_file(out / "halting_solve.json", json.dumps(result, indent=1, default=str) + "\n")
    write_file(out / "halting_solve.md", markdown(result))
    plot_quality(result, out / "quality_vs_loops.png")
    plot_loops_vs_masked(result, out / "loops_vs_masked.png")


if __name__ == "__main__":
    run_script(main)
