"""`loopmdm sample-bench RUN`: generation quality against compute for every way of spending
loops at inference -- fixed S, a schedule over t, adaptive halting (per call, per sequence,
per token) and warm starts -- at several numbers of denoising steps.

Quality: generative perplexity under an autoregressive judge trained here on the same corpus
and tokenizer (evaluation/judge.py; `--judge RUN`), beside the samples' unigram entropy, and
the same two numbers for real validation text as the reference. Compute: denoiser calls,
loops per call, FLOPs per generated token (computed and, for per-row/per-token halting, the
active FLOPs a skipping implementation would spend), wall time and samples per second.
Every configuration samples from the same seed, so differences are paired.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from loopmdm.data.loader import eval_rows
from loopmdm.errors import LoopMDMError, require
from loopmdm.evaluation.judge import generative_perplexity, unigram_entropy
from loopmdm.sampling.generate import SamplerSpec, generate
from loopmdm.sampling.halting import HALT_RULES, Halting
from loopmdm.userfiles import save_figure, write_file

DEFAULT_STEPS = (16, 64, 256)
DEFAULT_LOOPS = (1, 2, 4, 8, 12, 24)
DEFAULT_TAUS = (0.2, 0.1, 0.05)


def parse_rules(text: str) -> list[tuple[str, list[float]]]:
    """`--rules` spelling 'RULE:TAU:TAU,RULE:TAU' -> [(rule, [tau, ...])]: the halting rules
    (sampling/halting.py) a bench adds, each at its own thresholds (rules read different units)."""
    out = []
    for part in (p.strip() for p in str(text).split(",") if p.strip()):
        name, *taus = part.split(":")
        if name not in HALT_RULES:
            raise LoopMDMError(f"--rules: halting rule '{name}' is not allowed; choose one of: {', '.join(HALT_RULES)}")
        try:
            values = [float(x) for x in taus]
        except ValueError:
            values = []
        if not values or not all(math.isfinite(v) and v > 0 for v in values):
            raise LoopMDMError(f"--rules: '{part}' needs one or more thresholds > 0 after the rule, e.g. '{name}:0.1:0.05'")
        out.append((name, values))
    return out


def default_specs(model, loops=DEFAULT_LOOPS, taus=DEFAULT_TAUS, rules=(), extras: bool = True) -> list[SamplerSpec]:
    """Fixed S, a t-schedule peaking at S_max, adaptive halting per call at each tau (capped at
    the largest S), per-sequence and per-token halting and warm starts at the middle tau; then
    each (rule, taus) of `rules` per call. `extras=False` leaves out the t-schedule, the
    sequence / token halting and the warm starts (a quality-vs-loops sweep of the rules)."""
    if not model.is_looped:
        return [SamplerSpec("1")]
    cap, s_max = max(loops), model.cfg.max_train_loops
    specs = [SamplerSpec(str(s)) for s in loops]
    if extras:
        specs.append(SamplerSpec(f"noise:1:{s_max}"))
    specs += [SamplerSpec(str(cap), Halting(tau, 1, "call")) for tau in taus]
    if extras and taus:
        mid = sorted(taus)[len(taus) // 2]
        specs += [SamplerSpec(str(cap), Halting(mid, 1, "sequence")), SamplerSpec(str(cap), Halting(mid, 1, "token")),
                  SamplerSpec("2", warm_start=True), SamplerSpec(str(cap), Halting(mid, 1, "call"), warm_start=True)]
    specs += [SamplerSpec(str(cap), Halting(tau, 1, "call", rule)) for rule, rule_taus in rules for tau in rule_taus]
    return specs


def reference_rows(blocks, num: int) -> np.ndarray:
    """`num` validation rows spread evenly over the split (splits are stored in document order,
    so the first rows would all come from the first documents)."""
    return np.asarray(blocks)[eval_rows(len(blocks), num, 1)]


def reference_quality(judge, blocks, num: int, pad_id: int | None) -> dict:
    """Judge perplexity and unigram entropy of `num` real validation sequences spread over the
    split (the target)."""
    rows = torch.as_tensor(reference_rows(blocks, num).astype("int64"))
    require(pad_id is None or not bool((rows == pad_id).any()),
            "the reference rows hold pads (packing: pad); sample-bench expects packing: wrap")
    out = {"entropy": unigram_entropy(rows)}
    if judge is not None:
        out.update(generative_perplexity(judge, rows))
    return out


def infill_template(blocks, num: int, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditional generation on held-out text: `num` validation rows (spread over the split)
    with their middle half masked; returns (template, truth)."""
    rows = torch.as_tensor(reference_rows(blocks, num).astype("int64"))
    L = rows.shape[1]
    template = rows.clone()
    template[:, L // 4: L - L // 4] = mask_id
    return template, rows


def run_bench(run, specs: list[SamplerSpec], steps_list, *, num: int, sampler: str, seed: int,
              temperature: float = 1.0, judge=None, progress=None, infill_rows=None,
              done: list | None = None, on_record=None) -> list[dict]:
    """One record per (steps, spec): quality and compute. With `infill_rows` (a template and
    its truth from `infill_template`) also conditional quality: the accuracy of the filled
    middle against the held-out text and the judge's perplexity of the completed rows.
    With `num` = 0 only the infill rows are sampled (their calls are the compute record).
    Resumable: configurations already in `done` (records of an interrupted bench with the
    same settings) are kept, not rerun; `on_record(records)` sees the list after each one."""
    model, cfg = run.model, run.cfg
    seq_len = cfg.data.seq_len
    finished = {(r["steps"], r["label"]): r for r in (done or [])}
    wanted = {(steps, spec.label) for steps in steps_list for spec in specs}
    kept = [r for key, r in finished.items() if key not in wanted]  # other step counts of an earlier bench
    records = []
    for steps in steps_list:
        for spec in specs:
            if (steps, spec.label) in finished:
                records.append(finished[(steps, spec.label)])
                continue
            stats = None
            if num > 0:
                template = torch.full((num, seq_len), model.mask_id, dtype=torch.long, device=run.device)
                result, stats = generate(model, cfg, template, spec, steps=steps, sampler=sampler,
                                         temperature=temperature, seed=seed)
                stats["entropy"] = unigram_entropy(result.tokens)
                if judge is not None:
                    stats.update(generative_perplexity(judge, result.tokens))
            if infill_rows is not None:
                template, truth = (r.to(run.device) for r in infill_rows)
                filled, infill_stats = generate(model, cfg, template, spec, steps=steps, sampler=sampler,
                                                temperature=temperature, seed=seed)
                if stats is None:  # --num 0: the infill calls are the compute record
                    stats = dict(infill_stats, entropy=unigram_entropy(filled.tokens))
                blank = template == model.mask_id
                stats["infill_acc"] = float((filled.tokens == truth)[blank].float().mean())
                if judge is not None:
                    stats["infill_ppl"] = generative_perplexity(judge, filled.tokens)["gen_ppl"]
            records.append(stats)
            if progress is not None:
                progress(stats)
            if on_record is not None:
                on_record(sorted(records + kept, key=lambda r: r["steps"]))
    return sorted(records + kept, key=lambda r: r["steps"])


def _num(x, digits=2):
    return "—" if x is None else f"{x:.{digits}f}"


def markdown_table(records: list[dict], reference: dict) -> str:
    infill = any("infill_acc" in r for r in records)
    extra_head = " infill acc | infill PPL |" if infill else ""
    lines = ["| steps | sampler | gen PPL | entropy | calls | loops/call | loops/row | GFLOPs/token (active) | samples/s |" + extra_head,
             "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if infill else "")]
    lines.append(f"| — | validation text (reference) | {_num(reference.get('gen_ppl'), 1)} | {_num(reference['entropy'])} "
                 "| | | | | |" + (" 1.00 | |" if infill else ""))
    for r in records:
        active = "" if abs(r["active_flops_per_token"] - r["flops_per_token"]) < 1e-6 * r["flops_per_token"] \
            else f" ({r['active_flops_per_token'] / 1e9:.3f})"
        lines.append(f"| {r['steps']} | {r['label']} | {_num(r.get('gen_ppl'), 1)} | {_num(r['entropy'])} | {r['calls']} "
                     f"| {r['loops_mean']:.2f} | {r['row_loops_mean']:.2f} | {r['flops_per_token'] / 1e9:.3f}{active} "
                     f"| {r['samples_per_s']:.2f} |"
                     + (f" {_num(r.get('infill_acc'), 3)} | {_num(r.get('infill_ppl'), 1)} |" if infill else ""))
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path, title: str) -> None:
    """Generative perplexity against active FLOPs per generated token, one panel per step count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps_list = sorted({r["steps"] for r in records})
    fig, axes = plt.subplots(1, len(steps_list), figsize=(5 * len(steps_list), 4), squeeze=False)
    for ax, steps in zip(axes[0], steps_list):
        rows = [r for r in records if r["steps"] == steps and r.get("gen_ppl") is not None]
        fixed = [r for r in rows if r["label"].startswith("S=") and ":" not in r["loops"] and "warm" not in r["label"]]
        fixed.sort(key=lambda r: r["active_flops_per_token"])
        ax.plot([r["active_flops_per_token"] / 1e9 for r in fixed], [r["gen_ppl"] for r in fixed], "o-", label="fixed S")
        for r in fixed:
            ax.annotate(r["loops"], (r["active_flops_per_token"] / 1e9, r["gen_ppl"]), fontsize=7)
        for r in rows:
            if r in fixed:
                continue
            ax.plot(r["active_flops_per_token"] / 1e9, r["gen_ppl"], "x", label=r["label"])
        ax.set_title(f"{steps} steps")
        ax.set_xlabel("GFLOPs per generated token (active)")
        ax.set_ylabel("generative perplexity (judge)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)


def settings_key(meta: dict) -> dict:
    """What must match for an interrupted bench's records to be reused."""
    return {k: meta[k] for k in ("run", "judge", "step", "sampler", "num", "seed", "infill")}


def load_partial(out_dir: Path, meta: dict) -> list[dict]:
    """Records of an earlier bench into `out_dir` with the same settings (else none)."""
    path = out_dir / "sample_bench.json"
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        return old["records"] if settings_key(old["meta"]) == settings_key(meta) else []
    except (OSError, ValueError, KeyError, TypeError):
        return []


def write_json(out_dir: Path, meta: dict, reference: dict, records: list[dict]) -> Path:
    """sample_bench.json, replaced atomically (a kill mid-write keeps the previous one)."""
    return write_file(out_dir / "sample_bench.json",
                      json.dumps({"meta": meta, "reference": reference, "records": records}, indent=1) + "\n")


def write_outputs(out_dir: Path, meta: dict, reference: dict, records: list[dict]) -> list[Path]:
    write_json(out_dir, meta, reference, records)
    header = (f"# sample-bench: {meta['run']}\n\n{meta['description']}\n\n"
              f"```bash\n{meta['command']}\n```\n\n")
    write_file(out_dir / "sample_bench.md", header + markdown_table(records, reference))
    paths = [out_dir / "sample_bench.json", out_dir / "sample_bench.md"]
    if any(r.get("gen_ppl") is not None for r in records):
        plot(records, out_dir / "sample_bench.png", meta["run"])
        paths.append(out_dir / "sample_bench.png")
    return paths
