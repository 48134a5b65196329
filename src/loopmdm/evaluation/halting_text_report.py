"""The text halting benchmark's report (benchmarks/halting_text.py): markdown tables and three
plots, built on halting_report.py's helpers.

`halting_text.md`: per measure (infill, samples) every row's scores against mean loops per
row-call with the paired s.e. against fixed S_max, loops early / late and the histogram; the
saving at equal quality per rule with its bootstrap band; per-token halting's wall time against
its FLOPs. `quality_vs_loops.png` (one panel per score), `loops_vs_masked.png` (the infill rows,
halting_report.plot_loops_vs_masked) and `loops_hist.png` draw the same rows.
"""

from __future__ import annotations

from pathlib import Path

from loopmdm.evaluation.halting_report import _early_late, _hist_text, _num, _plt, _save, plot_loops_vs_masked

TITLES = {"acc": "infill accuracy (exact char)", "judge_nll": "judge NLL (nats/char)", "entropy": "unigram entropy"}


def _score(row: dict, name: str) -> str:
    value = row.get(name)
    if value is None:
        return "—"
    vs = row.get("vs_ref", {}).get(name)
    text = f"{value:.4f}"
    return text if vs is None or row["label"] == row.get("_ref") else f"{text} ({vs['diff']:+.4f} ± {vs['se']:.4f})"


def measure_table(section: dict) -> list[str]:
    names = section["measures"]
    head = " | ".join(f"{TITLES[n]} (Δ vs ref ± s.e.)" for n in names)
    lines = [f"| row | mean loops | {head} | entropy | matches | GFLOPs/token | loops early / late (t > ½ / ≤ ½) "
             "| histogram (loops: share of row-calls) |",
             "|---|---|" + "---|" * len(names) + "---|---|---|---|---|"]
    for r in section["rows"]:
        r = dict(r, _ref=section["reference"])
        model_row = r["kind"] != "reference"
        lines.append(
            f"| {r['label']} | {r['mean_loops']:.2f} | " + " | ".join(_score(r, n) for n in names)
            + f" | {r['entropy']:.3f} | {('yes' if r['matches'] else 'no') if model_row else '—'} | "
            + (f"{r['flops_per_token'] / 1e9:.4f}" if model_row and r.get("flops_per_token") else "—") + " | "
            + (_early_late(r["by_t"]) if model_row else "") + " | " + (_hist_text(r["hist"]) if model_row else "") + " |")
    return lines


def savings_table(section: dict) -> list[str]:
    lines = ["| group | best matching setting | mean loops | saving | band | vs fixed (band) | P(some setting matches) |",
             "|---|---|---|---|---|---|---|"]
    for group, sv in section["savings"].items():
        boot = section["saving_bands"].get(group, {})
        band, vs = boot.get("band"), boot.get("vs_fixed")
        lines.append(f"| {group} | {sv['label'] or '— (none matches)'} | {_num(sv['loops'], '.2f')} | "
                     f"{_num(sv['saving'], '.2f')} | {'—' if band is None else f'{band[0]:.2f}–{band[1]:.2f}'} | "
                     f"{'—' if vs is None else f'{vs[0]:.2f}–{vs[1]:.2f}'} | {_num(boot.get('p_match'), '.2f')} |")
    return lines


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# Halting on character-level text: quality against loops",
             "",
             f"Run `{s['run']}` ({result['weights']}), S_max = {s['s_max']}, halting granularity "
             f"`{s['granularity']}`, cap S_max; MDM `{s['mdm']}` ({result.get('mdm_weights')}); judge `{s['judge']}` "
             f"({result.get('judge_weights')}, test NLL {_num(result.get('judge_test_nll'), '.4f')} nats/char). "
             f"Test split, rows spread over it; ancestral sampler, {s['steps']} steps, seed {s['seed']} "
             "(the same rows, unmasking positions and draws in every row of a table). Loops are per row-call "
             "(rows with masked positions left); error = paired s.e. of the difference against the reference "
             "(fixed S_max) over rows; a setting matches when it is within 1 s.e. on every score of the table.",
             f"{result['machine']}, {result['date']}; `{result['command']}`"]
    for key, title in (("infill", "Infill (primary)"), ("samples", "Unconditional samples")):
        section = result.get(key)
        if section is None:
            continue
        n = section["rows"][0]["n"]
        what = ("middle half of each row masked, filled greedily (temperature 0); judge NLL of the fill and "
                "the text after it given the text before it; entropy of the fill" if key == "infill" else
                "all-mask rows sampled at temperature 1; judge NLL of each sample (gen PPL = exp); entropy "
                "of the sample")
        lines += ["", f"## {title}: {n} rows", "", what + f". Reference: {section['reference']}.", ""]
        lines += measure_table(section)
        oracle = next((r for r in section["rows"] if r["kind"] == "oracle"), None)
        if oracle is not None and "settled_loops" in oracle:
            lines += ["", f"Oracle: first agreement with S_max's tokens at the committed positions at "
                          f"{oracle['mean_loops']:.2f} loops per row-call; agreeing from then on at "
                          f"{oracle['settled_loops']:.2f}."]
        lines += ["", f"### Saving at equal quality ({key})", "",
                  "saving = S_max / (lowest mean loops among the matching settings); band = 5–95 % of a paired "
                  "bootstrap over rows (a resample without a matching setting counts as 1); vs fixed = saving / "
                  "fixed S's saving (> 1: the rule beats the smallest matching fixed S).", ""]
        lines += savings_table(section)
        for note in section.get("notes", []):
            lines += ["", f"Note: {note}"]
    timings = result.get("token_timing") or []
    if isinstance(timings, dict):  # files written before several rules were timed
        timings = [timings]
    if timings:
        m = [k for k in ("acc", "judge_nll") if k in timings[0]]
        first = timings[0]
        lines += ["", "## Per-token halting: wall time against FLOPs", "",
                  f"Granularity token, against dense fixed S_max on the first {first['n']} infill rows and the same "
                  f"draws; median of {first['repeats']} interleaved runs. Active FLOPs count frozen positions' keys "
                  "and values as cached, which `loop_step_at` does not yet do; computed FLOPs are what ran (a rule "
                  "that reads the prediction pays the coda and head at every iteration).", "",
                  "| rule | dense S_max s | token s | time ratio | active FLOPs ratio | computed FLOPs ratio | mean loops | "
                  + " | ".join(f"{TITLES[k]} token (Δ vs dense ± s.e.)" for k in m) + " |",
                  "|---|---|---|---|---|---|---|" + "---|" * len(m)]
        for tt in timings:
            lines.append(f"| `{tt['rule']}` τ = {tt['tau']:g} | {tt['dense_seconds']:.2f} | {tt['token_seconds']:.2f} | "
                         f"{tt['time_ratio']:.3f} | {tt['active_flops_ratio']:.3f} | {tt['computed_flops_ratio']:.3f} | "
                         f"{tt['mean_loops']:.2f} | "
                         + " | ".join(f"{tt[k]:.4f} ({tt[k + '_diff']:+.4f} ± {tt[k + '_se']:.4f})" for k in m) + " |")
    examples = result.get("examples")
    if examples:
        lines += ["", "## Examples (infill, first rows; `_` marks the filled span's edges)", ""]
        for label, texts in examples.items():
            lines += [f"**{label}**", "", "```"] + [t.replace("\n", "⏎") for t in texts] + ["```", ""]
    for note in result.get("notes", []):
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def plot_quality(result: dict, path: Path) -> Path:
    """Each score against mean loops per row-call, one panel each (infill accuracy, infill
    judge NLL, samples' judge NLL): the fixed-S curve, each rule's points, the oracle, and the
    MDM / test text as lines; error bars = paired s.e. against fixed S_max."""
    plt = _plt()
    panels = [(k, name) for k in ("infill", "samples") if k in result for name in result[k]["measures"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.3), squeeze=False)
    for ax, (key, name) in zip(axes[0], panels):
        rows = result[key]["rows"]

        def se(r):
            return r["vs_ref"][name]["se"]

        def points(sel, **style):
            ax.errorbar([r["mean_loops"] for r in sel], [r[name] for r in sel], yerr=[se(r) for r in sel],
                        capsize=3, **style)

        points([r for r in rows if r["kind"] == "fixed"], fmt="o-", color="black", label="fixed S")
        for rule in dict.fromkeys(r["rule"] for r in rows if r["kind"] == "rule"):
            points([r for r in rows if r.get("rule") == rule], fmt="s--", label=rule, alpha=0.8)
        for r in rows:
            if r["kind"] == "oracle":
                ax.plot([r["mean_loops"]], [r[name]], "*", color="gold", markersize=14, markeredgecolor="black",
                        label="oracle")
            if r["kind"] == "mdm":
                ax.axhline(r[name], color="grey", linestyle=":", label="MDM (1 pass)")
            if r["label"] == "test text" and name != "acc":
                ax.axhline(r[name], color="green", linestyle="-.", label="test text")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("mean loops per row-call")
        ax.set_ylabel(TITLES[name])
        ax.set_title(f"{key}, n = {rows[0]['n']}; bars: paired s.e. vs S_max", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_loops_hist(section: dict, path: Path) -> Path:
    """Share of row-calls per loop count: each plotted rule setting and the oracle."""
    plt = _plt()
    sel = [r for r in section["rows"] if r["label"] in section["plotted_settings"] or r["kind"] == "oracle"]
    fig, ax = plt.subplots(figsize=(7, 4.3))
    width = 0.8 / max(len(sel), 1)
    for i, r in enumerate(sel):
        total = sum(r["hist"].values()) or 1
        ks = [int(k) for k in r["hist"]]
        ax.bar([k - 0.4 + (i + 0.5) * width for k in ks], [v / total for v in r["hist"].values()], width=width,
               label=r["label"])
    ax.set_xlabel("loops per row-call")
    ax.set_ylabel("share of row-calls")
    ax.set_title(f"{section['kind']}: loops per row-call", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def write_plots(result: dict, out: Path) -> list[Path]:
    section = result.get("infill") or result["samples"]
    return [plot_quality(result, out / "quality_vs_loops.png"),
            plot_loops_vs_masked({"rows": section["rows"], "plotted_settings": section["plotted_settings"],
                                  "settings": result["settings"]}, out / "loops_vs_masked.png"),
            plot_loops_hist(section, out / "loops_hist.png")]
