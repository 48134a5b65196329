"""summary.json, summary.md and PNG plots of a suite (experiments/runner.py)."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np

from loopmdm.config import load_config
from loopmdm.experiments.suites import arm_overrides, layer_passes, selection_nll
from loopmdm.runfiles import write_text_atomic


def _mean_band(values: list[float]) -> tuple[float, float | None]:
    """Mean over seeds and half the min-max spread (the noise band we quote; None for one seed)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float((arr.max() - arr.min()) / 2) if len(arr) > 1 else None


def _fmt(mean: float, band: float | None, digits: int = 3) -> str:
    return f"{mean:.{digits}f}" if band is None else f"{mean:.{digits}f} ± {band:.{digits}f}"


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


def _metric_table(suite, evaluations, arms, metric) -> dict:
    """{arm: {S: (mean, band)}} of metric(record) over seeds, for records keyed by loops."""
    table = {}
    for arm in arms:
        per_s: dict = {}
        for ev in evaluations.values():
            if ev["arm"] != arm:
                continue
            for rec in metric(ev):
                per_s.setdefault(rec[0], []).append(rec[1])
        table[arm] = {s: _mean_band(v) for s, v in sorted(per_s.items())}
    return table


def _render_table(title: str, table: dict, loops: list[int]) -> list[str]:
    lines = [f"**{title}**", "", "| arm | " + " | ".join(f"S = {s}" for s in loops) + " |",
             "|---|" + "---|" * len(loops)]
    for arm, per_s in table.items():
        cells = []
        for s in loops:
            if s in per_s:
                cells.append(_fmt(*per_s[s]))
            elif len(per_s) == 1:  # a non-looped arm: the same at every S
                cells.append("(" + _fmt(*next(iter(per_s.values()))) + ")" if s == loops[0] else "″")
            else:
                cells.append("")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines + [""]


def _plot(path: Path, title: str, ylabel: str, table: dict, loops: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    puzzle needs; terms of a sum), per arm and S, summed over seeds: the rate and the number
    of examples in each column."""
    rows, columns = {}, set()
    for ev in evaluations.values():
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
    n = {d: max(v[1] for cells in rows.values() for dd, v in cells.items() if dd == d) for d in columns}
    lines = [f"**{order}: {title}** ({note})", "",
             "| arm, S | " + " | ".join(f"{d} (n={n[d]})" for d in columns) + " |", "|---|" + "---|" * len(columns)]
    for name, cells in table.items():
        lines.append(f"| {name} | " + " | ".join("" if cells.get(d) is None else f"{cells[d]:.2f}" for d in columns) + " |")
    return lines + [""]


def suite_scoring(suite):
    """How a task suite's answers are scored: its pairs (a fine-tuning suite) or its base config's task."""
    from loopmdm.evaluation.solve import scoring_of

    return scoring_of("pairs" if suite.pairs else load_config(suite.config).data.task)


def write_report(suite, scale_name, scale, out_dir: Path, sweep, final, evaluations,
                 wall_seconds: float | None, dry_run: bool) -> dict:
    arms = [a for a in suite.arms if any(ev["arm"] == a for ev in evaluations.values())]
    loops = list(suite.loops)
    arm_info = {}
    for arm in arms:
        overrides = arm_overrides(suite, arm, scale.budget_flops)
        cfg = load_config(suite.config, overrides)
        evs = [ev for ev in evaluations.values() if ev["arm"] == arm]
        arm_info[arm] = {"overrides": overrides, "lr": evs[0]["lr"],  # what the runs trained at
                         "layer_passes_per_step": layer_passes(cfg), "params": evs[0]["params"],
                         "steps": [ev["step"] for ev in evs], "train_minutes": [ev["train_time"] / 60 for ev in evs]}
    sweep_table = {}
    for spec in sweep:
        summary = json.loads((spec.out_dir / "train_summary.json").read_text())
        sweep_table.setdefault(spec.arm, {})[spec.lr] = selection_nll(summary)
    summary = {"suite": suite.name, "scale": scale_name, "dry_run": dry_run, "config": suite.config,
               "budget_flops": scale.budget_flops, "sweep_fraction": scale.sweep_fraction, "seeds": list(scale.seeds),
               "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
               "wall_seconds": wall_seconds, "arms": arm_info,
               "sweep_val_nll": {a: {str(lr): v for lr, v in d.items()} for a, d in sweep_table.items()},
               "tables": {}}
    extended = {spec.lr for spec in sweep if spec.lr not in scale.lrs}
    md = [f"# Suite `{suite.name}` ({scale_name} scale{', DRY RUN: measures nothing' if dry_run else ''})", "",
          f"Base config `{suite.config}`; every final run trains to {scale.budget_flops:.2e} FLOPs; seeds "
          f"{list(scale.seeds)}; learning rate per arm from a sweep over {list(scale.lrs)}"
          + (f" (extended to {sorted({f'{lr:g}' for lr in extended})} at the grid's edge)" if extended else "")
          + f" at {scale.sweep_fraction:g}× the budget (seed 0). Values are the mean over seeds ± half their spread.", "",
          "| arm | overrides | best lr | layer passes / step | params | steps | train minutes |",
          "|---|---|---|---|---|---|---|"]
    for arm, info in arm_info.items():
        md.append(f"| {arm} | `{' '.join(info['overrides']) or '(base)'}` | {info['lr']:g} | "
                  f"{info['layer_passes_per_step']:.2f} | {info['params']:,} | {info['steps']} | "
                  f"{', '.join(f'{m:.1f}' for m in info['train_minutes'])} |")
    lrs = sorted({lr for d in sweep_table.values() for lr in d})  # the grid plus any edge extensions
    extended = " (an lr outside the grid was tried where the arm's best was at the grid's edge)" \
        if set(lrs) - set(scale.lrs) else ""
    md += ["", f"Sweep (validation NELBO at the sweep budget, at the run's best validation where it kept one{extended}):", "",
           "| arm | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for arm, d in sweep_table.items():
        md.append(f"| {arm} | " + " | ".join(f"{d[lr]:.4f}" if lr in d else "" for lr in lrs) + " |")
    md.append("")

    nelbo = _metric_table(suite, evaluations, arms, lambda ev: [(r["loops"], r["nll"]) for r in ev["nelbo"]])
    summary["tables"]["val_nelbo"] = {a: {str(s): v for s, v in d.items()} for a, d in nelbo.items()}
    md += _render_table("Validation NELBO (nats per scored token) at inference S", nelbo, loops)
    _plot(out_dir / ("val_nelbo.png" if not suite.runs_of else f"val_nelbo-{suite.name}.png"), f"{suite.name}: validation NELBO", "NELBO (nats/token)", nelbo, loops)
    first = next(iter(evaluations.values()))["nelbo"][0]
    for label in first.get("by_t", {}):
        by_t = _metric_table(suite, evaluations, arms, lambda ev, b=label: [
            (r["loops"], r["by_t"][b]) for r in ev["nelbo"] if r.get("by_t", {}).get(b) is not None])
        summary["tables"][f"val_nelbo_t{label}"] = {a: {str(s): v for s, v in d.items()} for a, d in by_t.items()}
        md += _render_table(f"Validation NELBO of sequences with t in {label}", by_t, loops)
    if suite.kind == "task":
        from loopmdm.tasks import ByDifficulty

        scoring = suite_scoring(suite)
        key, title = scoring.headline
        for order in suite.orders:
            acc = _metric_table(suite, evaluations, arms,
                                lambda ev, o=order, k=key: [(r["loops"], r[k]) for r in ev["orders"][o]])
            name = f"{order}: {title}"
            summary["tables"][f"{order}_{key}"] = {a: {str(s): v for s, v in d.items()} for a, d in acc.items()}
            md += _render_table(name, acc, loops)
            _plot(out_dir / f"{order}_{key}.png", f"{suite.name}: {name}", key, acc, loops)
            for table in scoring.tables(next(iter(evaluations.values()))["orders"][order][0]):
                if isinstance(table, ByDifficulty):
                    md += _difficulty_table(order, evaluations, arms, summary, key=table.key, title=table.title,
                                            note=table.note)
                    continue
                per_s = _metric_table(suite, evaluations, arms,
                                      lambda ev, o=order, t=table: [(r["loops"], t.value(r)) for r in ev["orders"][o]])
                summary["tables"][f"{order}_{table.key}"] = {a: {str(s): v for s, v in d.items()} for a, d in per_s.items()}
                md += _render_table(f"{order}: {table.title}", per_s, loops)
    if "mdm" in arms and suite.kind == "lm":
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
    if any("test_nelbo" in ev for ev in evaluations.values()):  # a data-scarce suite (experiments/regime_report.py)
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
