"""The statistics of a halting benchmark (evaluation/halting_bench.py rows): is a setting as good
as fixed S_max, and how many loops does it save at that quality?

* **Noise band**: every row decodes the same puzzles, so a row is compared with fixed S_max
  puzzle by puzzle: d_i = solved_i(row) - solved_i(S_max), paired s.e. = sd(d) / sqrt(n)
  (sample sd, ddof = 1). A setting **matches** S_max when its solve rate is at least S_max's
  minus one paired s.e. Other scores are `Measure`s (a text row's infill accuracy, its judge
  NLL, where lower is better); with several, a setting matches when it matches on every one.
  ("Puzzle" below is any example the rows share: a Sudoku board, a text row.)
* **Saving** of a group (fixed S, each rule, the oracle): S_max / (the lowest mean loops among
  its matching settings). For fixed S that is the smallest matching S: an adaptive rule only
  helps if it beats that. A group with no matching setting saves nothing (None).
* **Its band**: a paired bootstrap over puzzles redoes all of it (rates, loops, s.e., matching,
  saving) on each resample; a resample where no setting of a group matches counts as saving 1
  (run S_max).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

MATCH_EPS = 1e-12  # float slack in "rate >= reference - s.e."


@dataclass(frozen=True)
class Measure:
    """A quality score a row carries: its aggregate (`row[name]`) and its value per example
    (`row[per_example]`, the same examples in every row, for the paired s.e.)."""

    name: str
    per_example: str
    higher_is_better: bool = True

    @property
    def sign(self) -> float:
        return 1.0 if self.higher_is_better else -1.0


SOLVED = Measure("solved", "per_puzzle_solved")


def paired_se(a, b) -> float:
    """Standard error of mean(a - b) for paired per-example scores."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(d) < 2:
        return 0.0
    return float(d.std(ddof=1) / math.sqrt(len(d)))


def matches(rate: float, ref_rate: float, se: float) -> bool:
    return rate >= ref_rate - se - MATCH_EPS


def compare_to(rows: list[dict], ref: dict, measures: tuple[Measure, ...] = (SOLVED,)) -> None:
    """Adds to each row (in place) its difference from `ref` in the first measure (solve rate),
    the paired s.e. and whether it matches; `vs_ref[name]` = {diff, se, matches} for each measure,
    and `matches` = all of them match."""
    for row in rows:
        ok = True
        for i, m in enumerate(measures):
            se = paired_se(row[m.per_example], ref[m.per_example])
            diff = row[m.name] - ref[m.name]
            match = matches(m.sign * row[m.name], m.sign * ref[m.name], se)
            if i == 0:
                row["diff_vs_ref"], row["se_vs_ref"] = diff, se
            row.setdefault("vs_ref", {})[m.name] = {"diff": diff, "se": se, "matches": match}
            ok = ok and match
        row["matches"] = ok


def group_of(row: dict) -> str | None:
    """Which saving a row counts towards: 'fixed', 'oracle' or its rule's name (MDM: none)."""
    return {"fixed": "fixed", "oracle": "oracle", "rule": row.get("rule")}.get(row["kind"])


def savings(rows: list[dict], s_max: int) -> dict:
    """{group: {"saving", "loops", "label"}} from rows that carry "matches" (compare_to)."""
    out = {}
    for row in rows:
        group = group_of(row)
        if group is None:
            continue
        best = out.setdefault(group, {"saving": None, "loops": None, "label": None})
        if row["matches"] and (best["loops"] is None or row["mean_loops"] < best["loops"]):
            best.update(loops=row["mean_loops"], label=row["label"], saving=s_max / row["mean_loops"])
    return out


def bootstrap_savings(rows: list[dict], ref: dict, s_max: int, resamples: int = 1000, seed: int = 0,
                      band: tuple[float, float] = (5.0, 95.0), measures: tuple[Measure, ...] = (SOLVED,)) -> dict:
    """{group: {"band": [lo, hi] of the saving, "vs_fixed": [lo, hi] of saving / fixed saving,
    "p_match": share of resamples where some setting matches}} from a paired bootstrap. A
    resample's aggregate is the mean of the per-example values (for a solve rate or a mean
    accuracy the same as the full data's; for a mean NLL per row a per-row mean)."""
    n = len(ref[measures[0].per_example])
    idx = np.random.default_rng(seed).integers(0, n, (resamples, n))
    best: dict[str, np.ndarray] = {}
    for row in rows:
        group = group_of(row)
        if group is None:
            continue
        ok = np.ones(resamples, dtype=bool)
        for m in measures:
            mine = m.sign * np.asarray(row[m.per_example], dtype=float)
            theirs = m.sign * np.asarray(ref[m.per_example], dtype=float)
            d = (mine - theirs)[idx]
            se = d.std(1, ddof=1) / math.sqrt(n) if n > 1 else np.zeros(resamples)
            ok &= mine[idx].mean(1) >= theirs[idx].mean(1) - se - MATCH_EPS
        calls = np.asarray(row["per_puzzle_calls"], dtype=float)[idx].sum(1)
        loops = np.asarray(row["per_puzzle_loop_sum"], dtype=float)[idx].sum(1) / np.maximum(calls, 1.0)
        cand = np.where(ok, loops, np.inf)
        best[group] = np.minimum(best.get(group, np.full(resamples, np.inf)), cand)
    out = {}
    fixed = np.where(np.isfinite(best["fixed"]), s_max / best["fixed"], 1.0) if "fixed" in best else None
    for group, loops in best.items():
        saving = np.where(np.isfinite(loops), s_max / loops, 1.0)
        entry = {"band": [float(v) for v in np.percentile(saving, band)],
                 "p_match": float(np.isfinite(loops).mean()), "resamples": resamples}
        if fixed is not None:
            entry["vs_fixed"] = [float(v) for v in np.percentile(saving / fixed, band)]
        out[group] = entry
    return out


def histogram(loops) -> dict[int, int]:
    """Row-calls per loop count (token granularity gives a mean over positions: rounded)."""
    return dict(sorted(Counter(int(round(x)) for x in loops).items()))


def by_bins(t, loops, bins: int = 10) -> list[dict]:
    """Mean loops per row-call in equal bins of t (fraction of the row's blanks still masked):
    bin i covers (i/bins, (i+1)/bins]."""
    t, loops = np.asarray(t, dtype=float), np.asarray(loops, dtype=float)
    which = np.clip(np.ceil(t * bins).astype(int) - 1, 0, bins - 1)
    out = []
    for i in range(bins):
        sel = which == i
        out.append({"lo": i / bins, "hi": (i + 1) / bins, "n": int(sel.sum()),
                    "mean_loops": float(loops[sel].mean()) if sel.any() else None})
    return out


def by_step(step, loops) -> list[dict]:
    """Mean loops per row-call at each decode step (blanks already filled in the row)."""
    step, loops = np.asarray(step), np.asarray(loops, dtype=float)
    return [{"step": int(s), "n": int((step == s).sum()), "mean_loops": float(loops[step == s].mean())}
            for s in np.unique(step)]


def summarise_calls(row: dict, bins: int = 10) -> None:
    """Adds the histogram and the curves against t and step to a row (in place)."""
    calls = row["calls"]
    row["hist"] = histogram(calls["loops"])
    row["by_t"] = by_bins(calls["t"], calls["loops"], bins)
    row["by_step"] = by_step(calls["step"], calls["loops"])
    if "settled" in calls:
        row["settled_by_t"] = by_bins(calls["t"], calls["settled"], bins)
