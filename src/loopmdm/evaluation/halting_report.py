"""The halting benchmark's report: markdown tables and two plots (benchmarks/halting_solve.py).

`halting_solve.md`: quality against mean loops per row-call with the paired s.e. against fixed
S_max, the saving per rule (and fixed S, the oracle) with its bootstrap band, the histogram of
loops per row-call and loops early / late in the decoding, and per-token halting's wall time
against its FLOPs. `quality_vs_loops.png` and `loops_vs_masked.png` draw the same rows.
"""

from __future__ import annotations

from pathlib import Path

from loopmdm.userfiles import save_figure


def _num(v, fmt: str = ".3f") -> str:
    return "—" if v is None else format(v, fmt)


def _hist_text(hist: dict) -> str:
    total = sum(hist.values()) or 1
    return " ".join(f"{k}:{100 * v / total:.0f}%" for k, v in hist.items())


def _early_late(by_t: list[dict]) -> str:
    """Mean loops on calls with more than half the blanks left, and with at most half."""
    def mean(bins):
        n = sum(b["n"] for b in bins)
        return sum(b["n"] * b["mean_loops"] for b in bins if b["n"]) / n if n else None
    return f"{_num(mean([b for b in by_t if b['lo'] >= 0.5]), '.2f')} / {_num(mean([b for b in by_t if b['lo'] < 0.5]), '.2f')}"


def markdown(result: dict) -> str:
    s = result["settings"]
    ref = result["reference"]
    lines = [f"# Halting on {result['task']} ({s['order']} order): quality against loops",
             "",
             f"Run `{s['run']}` ({result['weights']}), {result['n']} puzzles from the {result['split']} split "
             f"(seed {s['seed']}), S_max = {s['s_max']}, halting granularity `{s['granularity']}`, cap S_max. "
             f"Reference: {ref}. Loops are per row-call (rows with blanks left); error = paired s.e. of the "
             f"difference against the reference; a setting matches when its rate ≥ reference − 1 s.e.",
             f"{result['machine']}, {result['date']}; `{result['command']}`",
             "",
             "| row | mean loops | solved | cell acc | Δ vs ref ± s.e. | matches | loops early / late (t > ½ / ≤ ½) | histogram (loops: share of row-calls) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['label']} | {r['mean_loops']:.2f} | {r['solved']:.3f} | {_num(r.get('cell_acc'))} | "
                     f"{r['diff_vs_ref']:+.3f} ± {r['se_vs_ref']:.3f} | {'yes' if r['matches'] else 'no'} | "
                     f"{_early_late(r['by_t'])} | {_hist_text(r['hist'])} |")
    oracle = next((r for r in result["rows"] if r["kind"] == "oracle"), None)
    if oracle is not None and "settled_loops" in oracle:
        lines += ["", f"Oracle: first agreement with S_max's token at {oracle['mean_loops']:.2f} loops per row-call; "
                      f"agreeing from then on (no later flip) at {oracle['settled_loops']:.2f}."]
    lines += ["", "## Saving at equal quality",
              "",
              "saving = S_max / (lowest mean loops among the matching settings); band = 5–95 % of a paired "
              "bootstrap over puzzles (a resample without a matching setting counts as 1); "
              "vs fixed = saving / fixed S's saving (> 1: the rule beats the smallest matching fixed S).",
              "",
              "| group | best matching setting | mean loops | saving | band | vs fixed (band) | P(some setting matches) |",
              "|---|---|---|---|---|---|---|"]
    for group, sv in result["savings"].items():
        boot = result["saving_bands"].get(group, {})
        band = boot.get("band")
        vs = boot.get("vs_fixed")
        lines.append(f"| {group} | {sv['label'] or '— (none matches)'} | {_num(sv['loops'], '.2f')} | "
                     f"{_num(sv['saving'], '.2f')} | {'—' if band is None else f'{band[0]:.2f}–{band[1]:.2f}'} | "
                     f"{'—' if vs is None else f'{vs[0]:.2f}–{vs[1]:.2f}'} | {_num(boot.get('p_match'), '.2f')} |")
    tt = result.get("token_timing")
    if tt:
        lines += ["", "## Per-token halting: wall time against FLOPs",
                  "",
                  f"`{tt['rule']}` τ = {tt['tau']:g}, granularity token, the same puzzles as dense fixed S_max; "
                  f"median of {tt['repeats']} interleaved runs. Active FLOPs count frozen positions' keys and values "
                  "as cached, which `loop_step_at` does not yet do; computed FLOPs are the dense loop's.",
                  "",
                  "| dense S_max s | token s | time ratio | active FLOPs ratio | computed FLOPs ratio | mean loops | solved (Δ ± s.e.) |",
                  "|---|---|---|---|---|---|---|",
                  f"| {tt['dense_seconds']:.2f} | {tt['token_seconds']:.2f} | {tt['time_ratio']:.3f} | "
                  f"{tt['active_flops_ratio']:.3f} | {tt['computed_flops_ratio']:.3f} | {tt['mean_loops']:.2f} | "
                  f"{tt['solved']:.3f} ({tt['diff_vs_ref']:+.3f} ± {tt['se_vs_ref']:.3f}) |"]
    for note in result.get("notes", []):
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    try:
        save_figure(fig, path, dpi=110)
    finally:
        _plt().close(fig)
    return path


def plot_quality(result: dict, path: Path) -> Path:
    """Solve rate against mean loops per row-call: the fixed-S curve, each rule's points, the
    oracle, the MDM as a line; error bars = paired s.e. against the reference."""
    plt = _plt()
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))

    def points(sel, **style):
        ax.errorbar([r["mean_loops"] for r in sel], [r["solved"] for r in sel],
                    yerr=[r["se_vs_ref"] for r in sel], capsize=3, **style)

    points([r for r in rows if r["kind"] == "fixed"], fmt="o-", color="black", label="fixed S")
    for rule in dict.fromkeys(r["rule"] for r in rows if r["kind"] == "rule"):
        points([r for r in rows if r.get("rule") == rule], fmt="s--", label=rule, alpha=0.8)
    for r in rows:
        if r["kind"] == "oracle":
            ax.plot([r["mean_loops"]], [r["solved"]], "*", color="gold", markersize=14, markeredgecolor="black",
                    label="oracle (ceiling)")
        if r["kind"] == "mdm":
            ax.axhline(r["solved"], color="grey", linestyle=":", label="MDM")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("mean loops per row-call")
    ax.set_ylabel("boards solved" if result["task"] == "sudoku" else "score")
    ax.set_title(f"{result['task']}, {result['settings']['order']} order, n = {result['n']}; "
                 "bars: paired s.e. vs S_max", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_loops_vs_masked(result: dict, path: Path) -> Path:
    """Mean loops per row-call against t (fraction of the row's blanks still masked): each rule
    at its best matching setting (else its middle threshold), the oracle and its settled form."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))

    def curve(bins, **style):
        pts = [((b["lo"] + b["hi"]) / 2, b["mean_loops"]) for b in bins if b["n"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], **style)

    for row in result["rows"]:
        if row["kind"] == "rule" and row["label"] in result["plotted_settings"]:
            curve(row["by_t"], marker="s", linestyle="--", label=row["label"])
        if row["kind"] == "oracle":
            curve(row["by_t"], marker="*", color="black", label="oracle (first agreement)")
            if "settled_by_t" in row:
                curve(row["settled_by_t"], marker="*", color="grey", linestyle=":", label="oracle (settled)")
    ax.axhline(result["settings"]["s_max"], color="grey", linewidth=0.8, label="S_max")
    ax.set_xlabel("t = fraction of the row's blanks still masked (1 = first call)")
    ax.set_ylabel("mean loops per row-call")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
