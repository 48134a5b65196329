"""summary.json, summary.md and PNG plots of a suite (experiments/runner.py)."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

from loopmdm.config import load_config
from loopmdm.experiments.suites import arm_overrides, layer_passes, suite_scoring, sweep_nll
from loopmdm.experiments.tables import SeedTable, render_seed_table, seed_table, seed_table_json
from loopmdm.runfiles import write_text_atomic


def flops_to_match(mdm_final_nll: float, mdm_flops: float, curve: list[dict]) -> float | None:
    """MDM's total FLOPs / the FLOPs at which `curve` first reaches MDM's final NELBO
    (linear interpolation between validation points); None if it never does."""
    prev = None
    for point in curve:
        if point["val_nll"] <= mdm_final_nll:
            if prev is None:
                return mdm_flops / point["flops"]
            f0, n0, f1, n1 = prev["flops"], prev["val_nll"], point["flops"], point["val_nll"]
            frac = (n0 - mdm_final_nll) / max(n0 - n1, 1e-12)
            return mdm_flops / (f0 + frac * (f1 - f0))
        prev = point
    return None


def _add_table(summary: dict, key: str, title: str, st: SeedTable, loops: list[int]) -> list[str]:
    """Record a seed table in summary.json (means under "tables", the rest under "seed_tables")
    and return its markdown: the means over its seeds, per seed, and paired against S = 1."""
    summary["tables"][key] = {a: {str(s): v for s, v in d.items()} for a, d in st.means.items()}
    summary["seed_tables"][key] = seed_table_json(st)
    return render_seed_table(title, st, loops)


def _plot(path: Path, title: str, ylabel: str, st: SeedTable, loops: list[int]) -> None:
    """The means over the table's seeds (bars: half their spread), or each seed's values where no
    seed has a value in every cell of every arm; the seeds drawn are in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if st.seeds:
        table, title = st.means, f"{title} (seeds {st.seeds})"
    else:
        table = {f"{arm} s{seed}": {s: (v, None) for s, v in per_s.items()}
                 for arm, d in st.per_seed.items() for seed, per_s in d.items()}
        title = f"{title} (per seed)"
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, per_s in table.items():
        if len(per_s) == 1:
            mean, band = next(iter(per_s.values()))
            ax.axhline(mean, linestyle="--", label=arm, color=None)
            continue
        xs = sorted(per_s)
        means = [per_s[s][0] for s in xs]
        bands = [per_s[s][1] or 0.0 for s in xs]
        ax.errorbar(xs, means, yerr=bands, marker="o", capsize=3, label=arm)
    ax.set_xscale("log", base=2)
    ax.set_xticks(loops, [str(s) for s in loops])
    ax.set_xlabel("loops at inference (S)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_curves(path: Path, evaluations: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ev in evaluations.items():
        curve = ev["val_curve"]
        ax.plot([p["flops"] for p in curve], [p["val_nll"] for p in curve], marker=".", label=name)
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation NELBO (nats/token, training S_max)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _difficulty_table(order: str, evaluations: dict, arms: list, summary: dict, key: str, title: str, note: str
                      ) -> list[str]:
    """Boards solved (or pairs answered exactly) by difficulty (rounds of single-deduction a
    puzzle needs; terms of a sum), per arm and S, pooled over the seeds that have a record at
    every S of every arm (the same seeds in every row): the rate and the number of examples in
    each column."""
    seeds = seed_table(evaluations, arms, lambda ev: [(r["loops"], 0.0) for r in ev["orders"][order]]).seeds
    rows, columns = {}, set()
    for ev in evaluations.values():
        if ev["arm"] not in arms or ev["seed"] not in seeds:
            continue
        for rec in ev["orders"][order]:
            for diff, entry in rec["by_difficulty"].items():
                cell = rows.setdefault((ev["arm"], rec["loops"]), {}).setdefault(diff, [0.0, 0])
                cell[0] += entry[key] * entry["n"]
                cell[1] += entry["n"]
                columns.add(diff)
    columns = sorted(columns, key=lambda d: (d == "guess", d.zfill(3)))
    table = {f"{arm} S={s}": {d: (v[0] / v[1] if v[1] else None) for d, v in cells.items()}
             for (arm, s), cells in sorted(rows.items(), key=lambda kv: (arms.index(kv[0][0]), kv[0][1]))}
    summary["tables"][f"{order}_{key}_by_difficulty"] = table
    summary["seed_tables"][f"{order}_{key}_by_difficulty"] = {"seeds": seeds}
    n = {d: max(v[1] for cells in rows.values() for dd, v in cells.items() if dd == d) for d in columns}
    lines = [f"**{order}: {title}** ({note}; seeds {seeds} pooled)", "",
             "| arm, S | " + " | ".join(f"{d} (n={n[d]})" for d in columns) + " |", "|---|" + "---|" * len(columns)]
    for name, cells in table.items():
        lines.append(f"| {name} | " + " | ".join("" if cells.get(d) is None else f"{cells[d]:.2f}" for d in columns) + " |")
    return lines + [""]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def write_report(suite, scale_name, scale, out_dir: Path, sweep, final, evaluations,
                 wall_seconds: float | None, dry_run: bool, recorded_sweep: dict | None = None,
                 lrs_from: str | None = None) -> dict:
    arms = [a for a in suite.arms if any(ev["arm"] == a for ev in evaluations.values())]
    loops = list(suite.loops)
    arm_info = {}
    for arm in arms:
        overrides = arm_overrides(suite, arm, scale.budget_flops, scale.overrides)
        cfg = load_config(suite.config, [*scale.overrides, *overrides])
        evs = [ev for ev in evaluations.values() if ev["arm"] == arm]
        arm_info[arm] = {"overrides": overrides, "lr": evs[0]["lr"],  # what the runs trained at
                         "layer_passes_per_step": layer_passes(cfg), "params": evs[0]["params"],
                         "steps": [ev["step"] for ev in evs], "train_minutes": [ev["train_time"] / 60 for ev in evs]}
    # {arm: {lr: {seed: NELBO}}}: this call's sweep runs, or the sweep an earlier report recorded (--lrs-from)
    per_seed = sweep_nll(sweep) if recorded_sweep is None else recorded_sweep
    sweep_table = {arm: {lr: sum(d.values()) / len(d) for lr, d in by_lr.items()} for arm, by_lr in per_seed.items()}
    sweep_seeds = sorted({seed for by_lr in per_seed.values() for d in by_lr.values() for seed in d})
    summary = {"suite": suite.name, "scale": scale_name, "dry_run": dry_run, "config": suite.config,
               "budget_flops": scale.budget_flops, "sweep_fraction": scale.sweep_fraction, "seeds": list(scale.seeds),
               "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
               "wall_seconds": wall_seconds, "arms": arm_info,
               # a diverged sweep run (sweep_nll: +inf) is null here: the summary is strict JSON
               "sweep_val_nll": {a: {str(lr): _finite(v) for lr, v in d.items()} for a, d in sweep_table.items()},
               "sweep_seeds": sweep_seeds,
               "sweep_val_nll_per_seed": {a: {str(lr): {str(k): _finite(v) for k, v in d.items()}
                                              for lr, d in by_lr.items()} for a, by_lr in per_seed.items()},
               "tables": {}, "seed_tables": {}, **({"lrs_from": str(lrs_from)} if lrs_from else {})}
    extended = {lr for by_lr in per_seed.values() for lr in by_lr if lr not in scale.lrs}
    md = [f"# Suite `{suite.name}` ({scale_name} scale{', DRY RUN: measures nothing' if dry_run else ''})", "",
          f"Base config `{suite.config}`; every final run trains to {scale.budget_flops:.2e} FLOPs; seeds "
          f"{list(scale.seeds)}; learning rate per arm from a sweep over {list(scale.lrs)}"
          + (f" (extended to {sorted({f'{lr:g}' for lr in extended})} at the grid's edge)" if extended else "")
          + f" at {scale.sweep_fraction:g}× the budget (seed{'s' if len(sweep_seeds) > 1 else ''} "
          + ", ".join(map(str, sweep_seeds)) + (": the lowest mean picks" if len(sweep_seeds) > 1 else "") + ")"
          + (f", as recorded in `{lrs_from}` (not re-run in this call)" if lrs_from else "") + ". Every table is computed over the same seeds in "
          "every cell (named beside it; a seed missing a cell is left out and said so): the mean over those seeds "
          "± half their spread, then each seed's values, then the paired difference S − (S = 1) within each seed, "
          "mean ± standard error over seeds.", "",
          "| arm | overrides | best lr | layer passes / step | params | steps | train minutes |",
          "|---|---|---|---|---|---|---|"]
    for arm, info in arm_info.items():
        md.append(f"| {arm} | `{' '.join(info['overrides']) or '(base)'}` | {info['lr']:g} | "
                  f"{info['layer_passes_per_step']:.2f} | {info['params']:,} | {info['steps']} | "
                  f"{', '.join(f'{m:.1f}' for m in info['train_minutes'])} |")
    lrs = sorted({lr for d in sweep_table.values() for lr in d})  # the grid plus any edge extensions
    extended = " (an lr outside the grid was tried where the arm's best was at the grid's edge)" \
        if set(lrs) - set(scale.lrs) else ""
    several = len(sweep_seeds) > 1
    seeds_note = f"; the mean over seeds {sweep_seeds}, then each seed's value" if several else ""
    md += ["", f"Sweep (validation NELBO at the sweep budget, at the run's best validation where it kept one"
               f"{seeds_note}{extended}):", "",
           "| arm | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]

    def cell(arm, lr):
        if lr not in sweep_table[arm]:
            return ""
        each = per_seed[arm][lr]
        return f"{sweep_table[arm][lr]:.4f}" + (" (" + ", ".join(f"{each[k]:.3f}" if k in each else "–"
                                                                 for k in sweep_seeds) + ")" if several else "")

    for arm in sweep_table:
        md.append(f"| {arm} | " + " | ".join(cell(arm, lr) for lr in lrs) + " |")
    md.append("")

    nelbo = seed_table(evaluations, arms, lambda ev: [(r["loops"], r["nll"]) for r in ev["nelbo"]])
    md += _add_table(summary, "val_nelbo", "Validation NELBO (nats per scored token) at inference S", nelbo, loops)
    _plot(out_dir / ("val_nelbo.png" if not suite.runs_of else f"val_nelbo-{suite.name}.png"),
          f"{suite.name}: validation NELBO", "NELBO (nats/token)", nelbo, loops)
    first = next(iter(evaluations.values()))["nelbo"][0]
    for label in first.get("by_t", {}):
        by_t = seed_table(evaluations, arms, lambda ev, b=label: [
            (r["loops"], r["by_t"][b]) for r in ev["nelbo"] if r.get("by_t", {}).get(b) is not None])
        md += _add_table(summary, f"val_nelbo_t{label}", f"Validation NELBO of sequences with t in {label}", by_t, loops)
    if suite.kind == "task":
        from loopmdm.tasks import ByDifficulty

        scoring = suite_scoring(suite)
        key, title = scoring.headline
        for order in suite.orders:
            acc = seed_table(evaluations, arms, lambda ev, o=order, k=key: [(r["loops"], r[k]) for r in ev["orders"][o]])
            name = f"{order}: {title}"
            md += _add_table(summary, f"{order}_{key}", name, acc, loops)
            _plot(out_dir / f"{order}_{key}.png", f"{suite.name}: {name}", key, acc, loops)
            for table in scoring.tables(next(iter(evaluations.values()))["orders"][order][0]):
                if isinstance(table, ByDifficulty):
                    md += _difficulty_table(order, evaluations, arms, summary, key=table.key, title=table.title,
                                            note=table.note)
                    continue
                per_s = seed_table(evaluations, arms,
                                   lambda ev, o=order, t=table: [(r["loops"], t.value(r)) for r in ev["orders"][o]])
                md += _add_table(summary, f"{order}_{table.key}", f"{order}: {table.title}", per_s, loops)
    scarce = any("test_nelbo" in ev for ev in evaluations.values())
    # A data-scarce suite reads FLOPs-to-match at the MDM's *best* validation NELBO, both ways
    # (regime_report.py); its final NELBO is past the best and would flatter the loop.
    if "mdm" in arms and suite.kind == "lm" and not scarce:
        ratios = {}
        for name, ev in evaluations.items():
            if ev["arm"] == "mdm":
                continue
            mdm = next(e for e in evaluations.values() if e["arm"] == "mdm" and e["seed"] == ev["seed"])
            ratio = flops_to_match(mdm["val_curve"][-1]["val_nll"], mdm["flops"], ev["val_curve"])
            ratios[name] = ratio
        summary["flops_to_match"] = ratios
        md += ["**FLOPs-to-match** (MDM's total FLOPs ÷ FLOPs at which the arm's validation curve first reaches "
               "MDM's final NELBO, same seed; paper: 3.34× on LM1B):", ""]
        md += [f"- {name}: " + (f"{r:.2f}×" if r else "never reached") for name, r in ratios.items()] + [""]
    if suite.kind == "task" and not scarce and "mdm" in arms and len(arms) > 1:
        # a task suite without a test split: FLOPs-to-match at the best, both ways, over the
        # seeds every arm has (regime_report.py reads it the same way for the data-scarce suites)
        from loopmdm.experiments.regime_report import flops_to_match_table

        seeds = sorted(set.intersection(*({ev["seed"] for ev in evaluations.values() if ev["arm"] == arm}
                                          for arm in arms)))
        if seeds:
            lines, summary["flops_to_match"] = flops_to_match_table(evaluations, arms, seeds)
            md += lines
    if not scarce:  # (a data-scarce suite has it in its regime section)
        from loopmdm.experiments.regime_report import attention_lines

        seeds = sorted(set.intersection(*({ev["seed"] for ev in evaluations.values() if ev["arm"] == arm}
                                          for arm in arms))) if arms else []
        lines, summary["attention"] = attention_lines(evaluations, arms, seeds)
        md += lines
    if scarce:  # a data-scarce suite (experiments/regime_report.py)
        from loopmdm.experiments.regime_report import regime_section

        lines, summary["regime"] = regime_section(suite, scale, out_dir, evaluations, arms)
        md += lines
    _plot_curves(out_dir / "val_curves.png", evaluations)
    if wall_seconds is None:  # --report-only: nothing ran in this call; the runs' own times are above
        md += [f"Report only, on {summary['machine']}: training times are the runs' own (table above).", ""]
    else:
        md += [f"Wall time of this call: {wall_seconds / 60:.1f} min on {summary['machine']}.", ""]
    summary["evaluations"] = evaluations
    stem = "summary" if not suite.runs_of else f"summary-{suite.name}"
    write_text_atomic(out_dir / f"{stem}.json", json.dumps(summary, indent=1, allow_nan=False) + "\n")
    write_text_atomic(out_dir / f"{stem}.md", "\n".join(md))
    return summary
