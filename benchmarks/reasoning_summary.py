"""Tabulate `loopmdm solve --json` files of a reasoning run folder (benchmarks/gpu_reasoning.sh,
benchmarks/sudoku_pairs_cpu.sh): exact match per arm, order and loop count, by difficulty, and the
training FLOPs / steps each run reached (from its metrics.jsonl).

    python benchmarks/reasoning_summary.py OUT_DIR      # writes OUT_DIR/summary.{json,md}
"""

import json
import sys
from pathlib import Path


def last_train_record(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (run / "metrics.jsonl").is_file() else []
    train = [r for r in rows if r.get("kind") == "train"]
    val = [r for r in rows if r.get("kind") == "val"]
    out = {"steps": train[-1]["step"] if train else 0, "flops": train[-1]["flops"] if train else 0.0}
    if val:
        out["val_nll"] = val[-1].get("val_nll")
    return out


def main(out_dir: str) -> None:
    out = Path(out_dir)
    runs = {p.name: last_train_record(p) for p in sorted(out.iterdir()) if (p / "metrics.jsonl").is_file()}
    solves = {}
    for f in sorted([*out.glob("solve-*.json"), *out.glob("*/solve-*.json")]):
        text = f.read_text().strip()
        solves[str(f.relative_to(out).with_suffix(""))] = json.loads(text) if text else None  # empty: stopped by its time cap
    lines = ["| run | steps | training FLOPs | last val NLL |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['steps']} | {r['flops']:.2e} | {r.get('val_nll') or float('nan'):.4f} |"
              for name, r in runs.items()]
    for name, records in solves.items():
        lines += ["", f"**{name}**", ""]
        if not records:
            lines.append("(no result: the solve stage did not finish)")
            continue
        levels = sorted({d for r in records for d in r.get("by_difficulty", {})}, key=lambda d: (len(d), d))
        head = "| S | n | exact | token acc | " + " | ".join(f"difficulty {d}" for d in levels) + " |"
        lines += [head, "|" + "---|" * (4 + len(levels))]
        for r in records:
            by = r.get("by_difficulty", {})
            cells = [f"{by[d]['exact']:.3f} (n={by[d]['n']})" if d in by else "" for d in levels]
            lines.append(f"| {r['loops']} | {r['n']} | {r['exact']:.3f} | {r.get('token_acc', float('nan')):.3f} | "
                         + " | ".join(cells) + " |")
    (out / "summary.json").write_text(json.dumps({"runs": runs, "solve": solves}, indent=1))
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python benchmarks/reasoning_summary.py OUT_DIR (a folder of runs and solve-*.json)")
    main(sys.argv[1])
