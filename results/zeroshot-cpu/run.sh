#!/usr/bin/env bash
# Zero-shot perplexity of the lm suite's MDM and LoopMDM (seed-0 runs) on the offline sets,
# two seeds of the (t, mask) draws. ~15 min on CPU-2 with OMP_NUM_THREADS=1.
# Usage: bash results/zeroshot-cpu/run.sh RUNS_DIR   (RUNS_DIR holds mdm-s0 and loop-s0)
set -euo pipefail
RUNS=${1:-results/lm-cpu/runs}
export OMP_NUM_THREADS=1
for arm in mdm loop; do
  for seed in 1234 1235; do
    loopmdm zeroshot "$RUNS/$arm-s0" --loops 1,4,8,12 --sets lambada,brown,gutenberg \
      --batches 6 --batch-size 64 --seed "$seed" --out "results/zeroshot-cpu/$arm-seed$seed"
  done
done
# The combined table (summary.md): NELBO mean ± half the spread over the two seeds, PPL bound of the mean.
python - <<'PY'
import json, math
arms = {arm: [json.load(open(f"results/zeroshot-cpu/{arm}-seed{s}.json")) for s in (1234, 1235)] for arm in ("mdm", "loop")}
cols = [("mdm", 1)] + [("loop", s) for s in arms["loop"][0]["loops"]]
head = ["set", "docs", "scored tokens", "unigram"] + [f"{'MDM' if a == 'mdm' else 'LoopMDM'} S = {s}" for a, s in cols]
lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
for i, entry in enumerate(arms["mdm"][0]["sets"]):
    cells = [entry["set"], f"{entry['docs']:,}", f"{entry['tokens']:,}", f"{entry['unigram_xent']:.3f} ({math.exp(entry['unigram_xent']):.0f})"]
    for arm, s in cols:
        v = [next(r["nll"] for r in rep["sets"][i]["results"] if r["loops"] == s) for rep in arms[arm]]
        m = sum(v) / 2
        cells.append(f"{m:.3f} ± {abs(v[0] - v[1]) / 2:.3f} ({math.exp(m):.0f})")
    lines.append("| " + " | ".join(cells) + " |")
open("results/zeroshot-cpu/summary.md", "w").write(
    "NELBO nats/token, mean ± half the spread over draw seeds 1234 and 1235 (PPL bound exp(mean) in brackets); "
    "unigram = add-one train unigram cross-entropy of the same rows.\n\n" + "\n".join(lines) + "\n")
print("\n".join(lines))
PY
