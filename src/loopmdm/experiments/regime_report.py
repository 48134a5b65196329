"""The report of a data-scarce suite (one with a test split and best-on-validation weights):
which regime each run is in, test NELBO per seed, paired differences with their standard
error, FLOPs-to-match in both directions, curves against FLOPs, epochs and steps, and
mask->mask attention per layer for every arm.

Every table uses the same seeds in every cell (the seeds every arm of the table finished);
differences are paired within a seed (same data order, same evaluation draws), so the
standard error is that of the per-seed differences: sample std / sqrt(n).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from loopmdm.experiments.tables import mean_se  # noqa: F401 (also this module's API)


def fmt_se(mean: float, se: float | None, digits: int = 4, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{mean:{sign}.{digits}f}" if se is None else f"{mean:{sign}.{digits}f} ± {se:.{digits}f}"


def first_reach(curve: list[dict], target: float, key: str = "flops") -> float | None:
    """`key` (flops, epoch or step) at which the validation curve first reaches `target`,
    linearly interpolated between validation points; None if it never does."""
    prev = None
    for point in curve:
        if point["val_nll"] <= target:
            if prev is None:
                return float(point[key])
            frac = (prev["val_nll"] - target) / max(prev["val_nll"] - point["val_nll"], 1e-12)
            return float(prev[key] + frac * (point[key] - prev[key]))
        prev = point
    return None


def best_point(curve: list[dict]) -> dict:
    return min(curve, key=lambda p: p["val_nll"])


def flops_ratio(reference: list[dict], other: list[dict]) -> float | None:
    """FLOPs at which `reference` reaches its best validation NELBO ÷ FLOPs at which `other`
    first reaches that NELBO (> 1: `other` gets there with fewer FLOPs); None if never."""
    best = best_point(reference)
    reach = first_reach(other, best["val_nll"])
    return None if reach is None else best["flops"] / reach


def flops_to_match_table(evaluations: dict, arms: list[str], seeds: list[int]) -> tuple[list[str], dict]:
    """FLOPs-to-match per seed in both directions between every pair of mdm / loop / deeper
    present, read at each reference's *best* validation NELBO (flops_ratio): markdown lines and
    {"ref -> other": [ratio or None per seed]}."""
    md = ["**FLOPs-to-match** on the validation curves (training S_max), per seed. "
          "`A → B`: FLOPs at which A reaches its best validation NELBO ÷ FLOPs at which B first reaches that "
          "value (the paper's reading with A = MDM; > 1: B needs fewer FLOPs; 'never': B never gets there "
          "within the budget).", "", "| direction | " + " | ".join(f"seed {s}" for s in seeds) + " |",
          "|---|" + "---|" * len(seeds)]
    out = {}
    pairs = [("mdm", "loop"), ("loop", "mdm"), ("mdm", "deeper"), ("deeper", "mdm"), ("deeper", "loop"), ("loop", "deeper")]
    for ref, other in pairs:
        if ref in arms and other in arms:
            ratios = [flops_ratio(_by(evaluations, ref, s)["val_curve"], _by(evaluations, other, s)["val_curve"])
                      for s in seeds]
            out[f"{ref} -> {other}"] = ratios
            md.append(f"| {ref} → {other} | " + " | ".join("never" if r is None else f"{r:.2f}×" for r in ratios) + " |")
    return md + [""], out


def regime_of(curve: list[dict]) -> str:
    """Where the run ended relative to its best validation NELBO."""
    best, last = best_point(curve), curve[-1]
    if best["step"] == last["step"]:
        return "still improving (best at the last validation)"
    return f"past its best by {last['val_nll'] - best['val_nll']:+.4f} (best at epoch {best.get('epoch', float('nan')):.1f})"


def _seeds_common(evaluations: dict, arms: list[str]) -> list[int]:
    seeds = None
    for arm in arms:
        mine = {ev["seed"] for ev in evaluations.values() if ev["arm"] == arm and "test_nelbo" in ev}
        seeds = mine if seeds is None else seeds & mine
    return sorted(seeds or [])


def _by(evaluations: dict, arm: str, seed: int) -> dict:
    return next(ev for ev in evaluations.values() if ev["arm"] == arm and ev["seed"] == seed)


def _test_nll(ev: dict, loops: int) -> float | None:
    rec = next((r for r in ev["test_nelbo"] if r["loops"] == loops), None)
    return None if rec is None else rec["nll"]


def _plot_curves(path: Path, evaluations: dict, arms: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    colors = {arm: f"C{i}" for i, arm in enumerate(arms)}
    for ev in evaluations.values():
        if ev["arm"] not in colors:
            continue
        curve = ev["val_curve"]
        for ax, key in zip(axes, ("flops", "epoch", "step")):
            if all(key in p for p in curve):
                ax.plot([p[key] for p in curve], [p["val_nll"] for p in curve], color=colors[ev["arm"]],
                        alpha=0.8, label=ev["arm"] if ev["seed"] == min(e["seed"] for e in evaluations.values()) else None)
                best = best_point(curve)
                ax.plot([best[key]], [best["val_nll"]], marker="*", color=colors[ev["arm"]], markersize=9)
    for ax, label in zip(axes, ("training FLOPs", "epochs over the capped train split", "optimizer steps")):
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log")
    axes[0].set_ylabel("validation NELBO (nats/token, training S_max)")
    axes[0].legend()
    fig.suptitle("validation curves per seed (star: the selected best checkpoint)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_test(path: Path, table: dict, loops: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (arm, per_s) in enumerate(table.items()):
        if len(per_s) == 1:
            (mean, se), = per_s.values()
            ax.axhline(mean, linestyle="--", color=f"C{i}", label=f"{arm} (no loop)")
            if se:
                ax.axhspan(mean - se, mean + se, color=f"C{i}", alpha=0.15)
            continue
        xs = sorted(per_s)
        ax.errorbar(xs, [per_s[s][0] for s in xs], yerr=[per_s[s][1] or 0 for s in xs], marker="o", capsize=3,
                    color=f"C{i}", label=arm)
    ax.set_xscale("log", base=2)
    ax.set_xticks(loops, [str(s) for s in loops])
    ax.set_xlabel("loops at inference (S)")
    ax.set_ylabel("test NELBO (nats/char), mean ± s.e. over seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def regime_section(suite, scale, out_dir: Path, evaluations: dict, arms: list[str]) -> tuple[list[str], dict]:
    """Markdown lines and the summary's "regime" entry."""
    loops = list(suite.loops)
    seeds = _seeds_common(evaluations, arms)
    out: dict = {"seeds": seeds, "runs": {}, "test_nelbo": {}, "paired": {}, "flops_to_match": {}, "attention": {}}
    md = ["## The data-scarce regime: selected on validation, reported on test", "",
          f"Seeds in every cell below: {seeds} (runs of other seeds are left out of every table). "
          "Each run is evaluated at its best validation checkpoint (early stopping on the validation split); "
          "the test split (held-out plays, or task examples of their own seed) was never used for a choice. ± is the standard error over seeds; differences "
          "are paired within a seed.", ""]
    # --- which regime each run is in -------------------------------------------------------
    md += ["| run | steps | epochs trained | best at epoch | best val NELBO | final val NELBO | regime | train min |",
           "|---|---|---|---|---|---|---|---|"]
    for name, ev in sorted(evaluations.items()):
        if ev["arm"] not in arms or ev["seed"] not in seeds:
            continue
        curve, best = ev["val_curve"], ev["best"]
        out["runs"][name] = {"steps": ev["step"], "epochs": ev.get("epochs"), "best": best,
                             "final_val_nll": curve[-1]["val_nll"], "regime": regime_of(curve),
                             "train_minutes": ev["train_time"] / 60}
        md.append(f"| {name} | {ev['step']} | {ev.get('epochs') or float('nan'):.1f} | {best.get('epoch', float('nan')):.1f} | "
                  f"{best['val_nll']:.4f} | {curve[-1]['val_nll']:.4f} | {regime_of(curve)} | {ev['train_time'] / 60:.1f} |")
    md.append("")
    # --- test NELBO per seed -------------------------------------------------------------------
    rows = []
    for arm in arms:
        looped = any(len(_by(evaluations, arm, s)["test_nelbo"]) > 1 for s in seeds)
        for s_loops in (loops if looped else [1]):
            values = [_test_nll(_by(evaluations, arm, seed), s_loops) for seed in seeds]
            if any(v is None for v in values):
                continue
            rows.append((arm, s_loops if looped else None, values))
    table = {}
    first = _by(evaluations, arms[0], seeds[0])["test_nelbo"][0] if seeds else {}
    md += [f"**Test NELBO** (nats per token; best-validation weights; {first.get('sequences', 0):,} test rows, "
           f"{first.get('tokens', 0):,} tokens, spread over the test split; the same draws at every S)", "",
           "| arm | S | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± s.e. |",
           "|---|---|" + "---|" * (len(seeds) + 1)]
    for arm, s_loops, values in rows:
        m, se = mean_se(values)
        table.setdefault(arm, {})[s_loops or 1] = (m, se)
        out["test_nelbo"].setdefault(arm, {})[str(s_loops or 1)] = {"per_seed": values, "mean": m, "se": se}
        md.append(f"| {arm} | {s_loops or '–'} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {fmt_se(m, se)} |")
    unigram = [ev.get("test_unigram_xent") for ev in evaluations.values() if ev.get("test_unigram_xent")]
    if unigram:
        md += ["", f"Unigram cross-entropy on the same test rows: {unigram[0]:.4f}."]
    md.append("")
    _plot_test(out_dir / "test_nelbo.png", table, loops)

    # --- paired differences --------------------------------------------------------------------
    def paired(a_arm, a_s, b_arm, b_s) -> tuple[float, float | None, list[float]] | None:
        diffs = []
        for seed in seeds:
            a, b = _test_nll(_by(evaluations, a_arm, seed), a_s), _test_nll(_by(evaluations, b_arm, seed), b_s)
            if a is None or b is None:
                return None
            diffs.append(a - b)
        return (*mean_se(diffs), diffs)

    lines = []

    def add(key: str, d) -> None:
        if d:
            out["paired"][key] = {"mean": d[0], "se": d[1], "per_seed": d[2]}
            lines.append((key, d))

    # Every looped arm (LoopMDM, and the knob arms, which are LoopMDMs too) at each S: against each
    # one-shot arm, a knob arm against LoopMDM at the same S (never at S = 1 alone: the knob may be
    # what makes the loop pay), and against its own S = 1.
    looped = {arm: sorted(int(k) for k in out["test_nelbo"].get(arm, {})) for arm in arms}
    looped = {arm: s_list for arm, s_list in looped.items() if len(s_list) > 1}
    for arm, s_list in looped.items():
        for other in [a for a in arms if a != arm and (a not in looped or (a == "loop" and arm != "loop"))]:
            for s_loops in s_list:
                if other in looped:
                    add(f"{arm} S={s_loops} - {other} S={s_loops}", paired(arm, s_loops, other, s_loops))
                else:
                    add(f"{arm} S={s_loops} - {other}", paired(arm, s_loops, other, 1))
        for s_loops in s_list[1:]:
            add(f"{arm} S={s_loops} - {arm} S={s_list[0]}", paired(arm, s_loops, arm, s_list[0]))
    if "deeper" in arms and "mdm" in arms:
        add("deeper - mdm", paired("deeper", 1, "mdm", 1))
    md += ["**Paired test-NELBO differences** (negative: the first is better)", "",
           "| difference | per seed | mean ± s.e. | mean / s.e. |", "|---|---|---|---|"]
    for key, (m, se, diffs) in lines:
        md.append(f"| {key} | " + ", ".join(f"{v:+.4f}" for v in diffs) + f" | {fmt_se(m, se, signed=True)} | "
                  + (f"{m / se:+.1f}" if se else "–") + " |")
    md.append("")

    # --- FLOPs-to-match, both directions ------------------------------------------------------
    lines, out["flops_to_match"] = flops_to_match_table(evaluations, arms, seeds)
    md += lines

    # --- attention -------------------------------------------------------------------------
    lines, out["attention"] = attention_lines(evaluations, arms, seeds)
    md += lines
    if suite.kind == "task":
        md += _task_section(suite, evaluations, arms, seeds, loops, out, scale.num_test)
    _plot_curves(out_dir / "val_curves_regime.png", evaluations, arms)
    md += ["Plots: `val_curves_regime.png` (validation NELBO against FLOPs, epochs and steps, per seed; "
           "star = selected checkpoint), `test_nelbo.png` (test NELBO against inference S).", ""]
    return md, out


def _task_score(ev: dict, order: str, key: str, loops: int) -> float | None:
    rec = next((r for r in ev.get("orders", {}).get(order, []) if r["loops"] == loops), None)
    return None if rec is None else float(rec[key])


def _task_section(suite, evaluations: dict, arms: list[str], seeds: list[int], loops: list[int], out: dict,
                  num_test: int) -> list[str]:
    """The task's headline score on the test puzzles (best-validation weights), per seed, and its
    paired differences: LoopMDM at each S against MDM, deeper and its own S = 1; deeper against MDM."""
    from loopmdm.experiments.suites import suite_scoring

    key, title = suite_scoring(suite).headline
    md: list[str] = []
    out["task"] = {}
    for order in suite.orders:
        rows, table = [], {}
        for arm in arms:
            looped = any(len(_by(evaluations, arm, s).get("orders", {}).get(order, [])) > 1 for s in seeds)
            for s_loops in (loops if looped else [1]):
                values = [_task_score(_by(evaluations, arm, seed), order, key, s_loops) for seed in seeds]
                if seeds and all(v is not None for v in values):
                    rows.append((arm, s_loops if looped else None, values))
                    table.setdefault(arm, {})[s_loops] = values
        if not rows:
            continue
        md += [f"**{order}: {title}** on {num_test} examples of the test split (best-validation weights; the "
               "same examples for every arm, seed and S)", "",
               "| arm | S | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± s.e. |",
               "|---|---|" + "---|" * (len(seeds) + 1)]
        for arm, s_loops, values in rows:
            m, se = mean_se(values)
            md.append(f"| {arm} | {s_loops or '–'} | " + " | ".join(f"{v:.3f}" for v in values)
                      + f" | {fmt_se(m, se, digits=3)} |")
        diffs = []

        def pair(a_arm, a_s, b_arm, b_s):
            a, b = table.get(a_arm, {}).get(a_s), table.get(b_arm, {}).get(b_s)
            if a is not None and b is not None:
                d = [x - y for x, y in zip(a, b)]
                name = f"{a_arm}{f' S={a_s}' if len(table[a_arm]) > 1 else ''} - {b_arm}{f' S={b_s}' if len(table[b_arm]) > 1 else ''}"
                diffs.append((name, d))

        loop_s = sorted(table.get("loop", {}))
        for s_loops in loop_s:
            for other in [a for a in arms if a != "loop"]:  # a looped other (a knob arm): at the same S
                pair("loop", s_loops, other, s_loops if len(table.get(other, {})) > 1 else 1)
        for s_loops in loop_s[1:]:
            pair("loop", s_loops, "loop", loop_s[0])
        pair("deeper", 1, "mdm", 1)
        md += ["", f"Paired differences of {title} (positive: the first is better):", "",
               "| difference | per seed | mean ± s.e. | mean / s.e. |", "|---|---|---|---|"]
        out["task"][order] = {"key": key, "per_seed": {arm: {str(s): v for s, v in d.items()} for arm, d in table.items()},
                              "paired": {}}
        for name, d in diffs:
            m, se = mean_se(d)
            out["task"][order]["paired"][name] = {"mean": m, "se": se, "per_seed": d}
            md.append(f"| {name} | " + ", ".join(f"{v:+.3f}" for v in d) + f" | {fmt_se(m, se, digits=3, signed=True)} | "
                      + (f"{m / se:+.1f}" if se else "–") + " |")
        md.append("")
    return md


def attention_lines(evaluations: dict, arms: list[str], seeds: list[int]) -> tuple[list[str], dict]:
    """Mask->mask attention per layer for every arm that has it at every one of `seeds` (the
    MDM's and deeper MDM's layers beside LoopMDM's per iteration; paper Sec. 5): markdown lines
    and {arm: {"layers", "mask_to_mask" (mean over seeds), "masked_key_frac", "num_loops"}}."""
    out: dict = {}
    md: list[str] = []
    for arm in arms:
        recs = [_by(evaluations, arm, s).get("mask_attention") for s in seeds]
        if not recs or any(r is None for r in recs):
            continue
        means = np.asarray([r["mask_to_mask"] for r in recs]).mean(0)
        out[arm] = {"layers": recs[0]["layers"], "mask_to_mask": means.tolist(),
                    "masked_key_frac": float(np.mean([r["masked_key_frac"] for r in recs])),
                    "num_loops": recs[0]["num_loops"]}
    if out:
        md += ["**Mask→mask attention** per layer in execution order (share of a masked query's attention on masked "
               f"keys, mean over seeds {seeds}; LoopMDM at its training S_max, so its loop layer appears once per "
               "iteration `@k`). Uniform attention would give the masked-key fraction.", ""]
        for arm, rec in out.items():
            md.append(f"- {arm} (masked-key fraction {rec['masked_key_frac']:.3f}): "
                      + ", ".join(f"{name} {v:.3f}" for name, v in zip(rec["layers"], rec["mask_to_mask"])))
        md.append("")
    return md, out
