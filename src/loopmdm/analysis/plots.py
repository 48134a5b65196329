"""PNG plots of `loop_diagnostics` results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

from loopmdm.userfiles import save_figure

PLOT_FILES = ("rel_change.png", "nelbo_vs_loops.png", "attention_mask_to_mask.png", "nelbo_by_t.png")


def _nan(values):
    return [float("nan") if v is None else v for v in values]


def _mark_train_range(ax, max_train_loops):
    if max_train_loops:
        ax.axvline(max_train_loops, color="grey", linestyle=":", linewidth=1, label=f"S_max = {max_train_loops}")


def plot_diagnostics(diag: dict, out_dir: str | Path, max_train_loops: int | None = None,
                     title: str = "") -> list[Path]:
    """Write the four plots of PLOT_FILES into `out_dir`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    rows = diag["per_loop"]
    ks = [r["k"] for r in rows]
    bins = diag["t_bins"]
    bin_names = [f"t in [{lo:g}, {hi:g}{']' if i == len(bins) - 2 else ')'}" for i, (lo, hi) in enumerate(zip(bins, bins[1:]))]
    paths = []

    def save(fig, ax, name, ylabel):
        ax.set_xlabel("loop iteration k (coda reads H^k)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if title:
            ax.set_title(title, fontsize=9)
        fig.tight_layout()
        path = out_dir / name
        try:
            save_figure(fig, path, dpi=110)
        finally:
            plt.close(fig)
        paths.append(path)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(ks, _nan([r["rel_change_masked"] for r in rows]), "o-", label="masked positions")
    ax.semilogy(ks, _nan([r["rel_change_unmasked"] for r in rows]), "s-", label="unmasked positions")
    _mark_train_range(ax, max_train_loops)
    save(fig, ax, PLOT_FILES[0], "||H^k - H^(k-1)|| / ||H^(k-1)||")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ks, _nan([r["nelbo"] for r in rows]), "o-", label="NELBO / token")
    _mark_train_range(ax, max_train_loops)
    save(fig, ax, PLOT_FILES[1], "NELBO per token (nats)")

    fig, ax = plt.subplots(figsize=(6, 4))
    if rows and rows[0].get("mask_to_mask") is not None:
        for i, layer in enumerate(diag["loop_layers"]):
            ax.plot(ks, _nan([r["mask_to_mask"][i] for r in rows]), "o-", label=f"layer {layer}")
    if diag.get("masked_key_frac") is not None:
        ax.axhline(diag["masked_key_frac"], color="black", linestyle="--", linewidth=1,
                   label="uniform attention (masked key fraction)")
    _mark_train_range(ax, max_train_loops)
    save(fig, ax, PLOT_FILES[2], "attention mass of masked queries on masked keys")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for j, name in enumerate(bin_names):
        values = _nan([r["nelbo_by_t"][j] for r in rows])
        ax1.plot(ks, values, "o-", label=f"{name} (n={diag['sequences_by_t'][j]})")
        ax2.plot(ks, [v - values[0] for v in values], "o-", label=name)
    ax1.set_ylabel("NELBO per token (nats)")
    for ax in (ax1, ax2):
        ax.set_xlabel("S (loop iterations)")
        _mark_train_range(ax, max_train_loops)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax2.set_ylabel("NELBO(S) - NELBO(1)")
    fig.suptitle(title or "NELBO by noise level t", fontsize=9)
    fig.tight_layout()
    path = out_dir / PLOT_FILES[3]
    try:
        save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)
    paths.append(path)
    return paths


def plot_nelbo_by_loops(path: str | Path, results: list[dict], unigram: float | None, title: str = "",
                        train_max: int | None = None, baseline: tuple[str, float] | None = None) -> Path:
    """NELBO per token against the inference loop count (one `evaluate_nelbo` record per S),
    with the unigram floor and the trained range marked. Written atomically."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from loopmdm.runfiles import write_bytes_atomic

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["loops"] for r in results]
    ax.plot(xs, [r["nll"] for r in results], marker="o", label="NELBO (nats/token)")
    if unigram is not None and math.isfinite(unigram):
        ax.axhline(unigram, color="C3", linestyle="--", label=f"unigram {unigram:.3f}")
    if baseline is not None:
        ax.axhline(baseline[1], color="C2", linestyle="-.", label=f"{baseline[0]} {baseline[1]:.3f}")
    _mark_train_range(ax, train_max)
    if len(xs) > 1 and min(xs) >= 1:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("loops at inference (S)")
    ax.set_ylabel("NELBO (nats/token), lower is better")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
    return path
