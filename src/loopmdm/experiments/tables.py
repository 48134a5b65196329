"""Report tables over seeds: every cell of a table over the same seeds, per seed, and paired.

A suite's evaluations hold one value per (arm, seed, S). Averaging whatever seeds exist at each
S mixes seeds across a row (issue 16: a two-seed mean at S = 1 and 8 beside seed 0 alone at
S = 2, 4, 12, 16 made a peak that seed 0 alone does not have). So a table of means here is
computed over the seeds that have a value in *every* cell of *every* arm it compares, says which
seeds those are and which it left out (and why), and comes with every seed's values and, per
arm, the paired differences S - (S = 1) within each seed (a comparison inside one arm: over the
seeds with a value at every S of that arm), mean ± standard error over those seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def mean_band(values: list[float]) -> tuple[float, float | None]:
    """Mean over seeds and half the min-max spread (the noise band we quote; None for one seed)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float((arr.max() - arr.min()) / 2) if len(arr) > 1 else None


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error (sample std / sqrt(n)); None for one value."""
    arr = np.asarray(values, dtype=np.float64)
    n = len(arr)
    return float(arr.mean()), float(arr.std(ddof=1) / math.sqrt(n)) if n > 1 else None


def fmt(mean: float, band: float | None, digits: int = 3, sign: bool = False) -> str:
    value = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    return value if band is None else f"{value} ± {band:.{digits}f}"


@dataclass
class SeedTable:
    per_seed: dict  # {arm: {seed: {S: value}}}: every value there is
    seeds: list  # the seeds every cell of `means` is computed over
    left_out: dict  # {arm: {seed: [S it has no value at]}} seeds of an arm not in `seeds` ([]: another arm lacks it)
    means: dict  # {arm: {S: (mean, half spread)}} over `seeds`
    arm_seeds: dict  # {arm: the seeds with a value at every S of that arm}
    paired: dict  # {arm: {S: (mean, standard error, n)}} of value(S) - value(S = 1) within each seed of arm_seeds


def seed_table(evaluations: dict, arms: list, metric) -> SeedTable:
    """`metric(evaluation)` -> [(S, value), ...]; evaluations carry "arm" and "seed"."""
    per_seed: dict = {arm: {} for arm in arms}
    for ev in evaluations.values():
        if ev["arm"] in per_seed:
            cells = per_seed[ev["arm"]].setdefault(ev["seed"], {})
            for s, value in metric(ev):
                cells[s] = value
    per_seed = {arm: {seed: dict(sorted(c.items())) for seed, c in sorted(d.items())} for arm, d in per_seed.items()}
    cells = {arm: sorted({s for c in d.values() for s in c}) for arm, d in per_seed.items()}
    complete = {arm: {seed for seed, c in d.items() if set(cells[arm]) <= set(c)}
                for arm, d in per_seed.items() if cells[arm]}
    seeds = sorted(set.intersection(*complete.values())) if complete else []
    left_out = {arm: {seed: [s for s in cells[arm] if s not in c] for seed, c in d.items() if seed not in seeds}
                for arm, d in per_seed.items()}
    left_out = {arm: d for arm, d in left_out.items() if d}
    means = {arm: {s: mean_band([per_seed[arm][seed][s] for seed in seeds]) for s in cells[arm]} if seeds else {}
             for arm in arms}
    arm_seeds = {arm: sorted(complete.get(arm, ())) for arm in arms}
    paired = {}
    for arm in arms:
        own = arm_seeds[arm]
        if own and 1 in cells[arm] and len(cells[arm]) > 1:
            base = [per_seed[arm][seed][1] for seed in own]
            paired[arm] = {s: (*mean_se([per_seed[arm][seed][s] - b for seed, b in zip(own, base)]), len(own))
                           for s in cells[arm] if s != 1}
    return SeedTable(per_seed, seeds, left_out, means, arm_seeds, paired)


def _seeds_note(st: SeedTable) -> str:
    if not st.seeds:
        return "no seed has a value in every cell of every arm: per-seed values only"
    note = f"seeds {st.seeds} in every cell"
    gone = []
    for arm, d in st.left_out.items():
        for seed, missing in d.items():
            why = f"no value at S = {', '.join(map(str, missing))}" if missing else "another arm lacks it"
            gone.append(f"{arm} seed {seed} ({why})")
    return note + (f"; left out: {'; '.join(gone)}" if gone else "")


def _cells(per_s: dict, loops: list, text) -> list[str]:
    cells = []
    for s in loops:
        if s in per_s:
            cells.append(text(per_s[s]))
        elif len(per_s) == 1:  # a non-looped arm: the same at every S
            cells.append("(" + text(next(iter(per_s.values()))) + ")" if s == loops[0] else "″")
        else:
            cells.append("")
    return cells


def render_means(title: str, means: dict, loops: list[int], note: str = "") -> list[str]:
    """`means` {arm: {S: (mean, band)}} as a markdown table, one column per S."""
    lines = [f"**{title}**" + (f" ({note})" if note else ""), "", "| arm | " + " | ".join(f"S = {s}" for s in loops) + " |",
             "|---|" + "---|" * len(loops)]
    for arm, per_s in means.items():
        lines.append(f"| {arm} | " + " | ".join(_cells(per_s, loops, lambda v: fmt(*v))) + " |")
    return lines + [""]


def render_seed_table(title: str, st: SeedTable, loops: list[int]) -> list[str]:
    """The table over its seeds (mean ± half spread), then every seed's values, then the paired
    differences against S = 1 (mean ± standard error over the table's seeds)."""
    lines = render_means(title, st.means, loops, note=f"{_seeds_note(st)}; mean ± half their spread")
    lines += ["Per seed:", "", "| arm, seed | " + " | ".join(f"S = {s}" for s in loops) + " |",
              "|---|" + "---|" * len(loops)]
    for arm, d in st.per_seed.items():
        for seed, per_s in d.items():
            tag = " (left out)" if st.seeds and seed not in st.seeds else ""
            lines.append(f"| {arm} s{seed}{tag} | " + " | ".join(_cells(per_s, loops, lambda v: f"{v:.3f}")) + " |")
    lines.append("")
    others = [s for s in loops if s != 1]
    if any(set(per_s) & set(others) for per_s in st.paired.values()):
        lines += ["Paired, S − (S = 1) within each seed: mean ± standard error (sample std / √n) over the arm's "
                  "seeds with a value at every S (one seed: no standard error):", "",
                  "| arm, seeds | " + " | ".join(f"S = {s}" for s in others) + " |", "|---|" + "---|" * len(others)]
        for arm, per_s in st.paired.items():
            if not set(per_s) & set(others):
                continue
            lines.append(f"| {arm}, {st.arm_seeds[arm]} | " + " | ".join(
                fmt(*per_s[s][:2], sign=True) if s in per_s else "" for s in others) + " |")
        lines.append("")
    return lines


def seed_table_json(st: SeedTable) -> dict:
    """The seeds, left-out seeds, per-seed values and paired differences, JSON-ready (string keys)."""
    return {"seeds": st.seeds, "arm_seeds": {arm: seeds for arm, seeds in st.arm_seeds.items()},
            "left_out": {arm: {str(seed): m for seed, m in d.items()} for arm, d in st.left_out.items()},
            "per_seed": {arm: {str(seed): {str(s): v for s, v in c.items()} for seed, c in d.items()}
                         for arm, d in st.per_seed.items()},
            "paired_vs_s1": {arm: {str(s): {"mean": m, "se": se, "n": n} for s, (m, se, n) in d.items()}
                             for arm, d in st.paired.items()}}
