"""Adaptive halting on character-level text: quality against mean loops (issue 19).

A character-level LoopMDM denoises the same held-out test rows with MDLM's ancestral sampler at
a fixed number of steps, at each fixed S, with each halting rule at each threshold (capped at
S_max, each row halting on its own), with the training-free oracle, beside an MDM and reference
rows (the test text itself, i.i.d. draws from the train split's unigram). Two measures: infill
(middle half of each row, greedy; exact-character accuracy and an autoregressive judge's NLL,
paired per row against fixed S_max) and unconditional samples (judge NLL = log gen PPL, unigram
entropy). Reports the saving at equal quality per rule with a bootstrap band, loops per call
against t and as a histogram, and per-token halting's wall time against its FLOPs
(evaluation/halting_text.py, halting_stats.py, halting_text_report.py). Writes
DIR/halting_text.{json,md}, DIR/calls.npz (every row-call) and DIR/quality_vs_loops.png,
DIR/loops_vs_masked.png, DIR/loops_hist.png:

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/halting_text.py \\
        results/retrofit-char-cpu-4k/runs/loop-s0 --mdm results/retrofit-char-cpu-4k/runs/mdm-s0 \\
        --judge runs/judge-char --infill 64 --samples 32 --out results/halting-char-cpu-retrofit/loop-s0
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from loopmdm.diffusion.schedule import make_schedule
from loopmdm.errors import require, run_script
from loopmdm.evaluation import halting_bench as hb
from loopmdm.evaluation import halting_text as ht
from loopmdm.evaluation.halting_text_report import markdown, write_plots
from loopmdm.sampling.halting import HALT_RULES
from loopmdm.userfiles import check_out_dir, write_file

DEFAULT_RULES = ("change:0.05,0.02;change-scaled:0.005,0.01,0.02;change-masked:0.02,0.05,0.1;"
                 "kl:1e-3,1e-2;flips:0.05,0.1")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="the character-level LoopMDM run directory")
    p.add_argument("--judge", required=True, help="an autoregressive run on the same data (model.causal=true)")
    p.add_argument("--mdm", default="", help="an MDM run on the same data: one row per measure, no loop")
    p.add_argument("--out", required=True, help="folder for halting_text.{json,md}, calls.npz and the plots")
    p.add_argument("--infill", type=int, default=64, help="test rows for the infill measure (0: skip)")
    p.add_argument("--samples", type=int, default=32, help="unconditional samples (0: skip)")
    p.add_argument("--steps", type=int, default=16, help="denoising steps (every row, both measures)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler's draws (and the unigram row's)")
    p.add_argument("--timing-rows", type=int, default=32, help="infill rows of the per-token timing (0: skip)")
    p.add_argument("--timing-repeats", type=int, default=3, help="per-token timing: runs of each arm")
    p.add_argument("--timing-rules", default="", help="'RULE:TAU;...' to time per token besides the rule with the "
                                                     "largest infill saving (e.g. a rule that reads no prediction)")
    p.add_argument("--judge-test-rows", type=int, default=0,
                   help="test rows for the judge's test NLL, spread over the split (0: all of them)")
    p.add_argument("--batch-size", type=int, default=64)
    hb.add_halting_options(p, DEFAULT_RULES, "row")
    return p.parse_args(argv)


def judge_test_nll(judge_run, blocks, rows: int) -> float:
    """The judge's next-character NLL (nats/char, characters 2..L of each row given the ones
    before) on the test split: every row, or `rows` spread over it."""
    blocks = ht.reference_rows(blocks, rows) if rows else np.asarray(blocks)
    return float(ht.judge_token_nll(judge_run.model, blocks).mean())


def example_texts(result: dict, tokenizer, mask_id: int, labels=("S = 1", "S = 8", "MDM", "test text"), num: int = 2):
    rows = {r["label"]: r for r in result["infill"]["rows"]}
    L = len(rows["test text"]["tokens"][0])
    out = {}
    for label in labels:
        if label in rows:
            out[label] = []
            for ids in rows[label]["tokens"][:num]:
                ids = [int(i) for i in ids]
                text = (tokenizer.decode(ids[:L // 4], mask_id=mask_id) + "_"
                        + tokenizer.decode(ids[L // 4:L - L // 4], mask_id=mask_id) + "_"
                        + tokenizer.decode(ids[L - L // 4:], mask_id=mask_id))
                out[label].append(text)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(args.threads, 1))
    out = check_out_dir(args.out, "--out")
    loops = hb.parse_loops(args.loops)
    require(args.infill > 0 or args.samples > 0, "--infill and --samples are both 0: nothing to measure")
    require(args.steps >= 1, f"--steps {args.steps} must be >= 1")
    rules = hb.parse_rule_taus(args.rules)
    extra_timed = [(r, t) for r, taus in (hb.parse_rule_taus(args.timing_rules) if args.timing_rules else [])
                   for t in taus]
    notes: list[str] = []
    started = time.perf_counter()

    run, weights, mdm_model, mdm_weights = hb.open_loop_and_mdm(args.run, args.mdm, args.device, notes)
    model = run.model
    judge_run, judge_weights = hb.open_run(args.judge, args.device, notes)
    require(judge_run.cfg.model.causal, f"--judge {args.judge} is not an autoregressive run (model.causal=true)")
    data = run.prepared_data()
    require(data.has_split("test"), f"the data of '{args.run}' has no test split (data.test_fraction=0.1)")
    test = data.blocks("test")
    for other, what in ((judge_run, "--judge"),):
        require(other.cfg.model.vocab_size == model.cfg.vocab_size and other.cfg.data.seq_len == run.cfg.data.seq_len
                and other.tokenizer.fingerprint() == run.tokenizer.fingerprint(),
                f"{what} '{other.run_dir}' has another tokenizer or length than the run: not the same data")
    s_max = args.s_max or model.cfg.max_train_loops
    common = dict(steps=args.steps, seed=args.seed, s_max=s_max, judge=judge_run.model,
                  schedule=make_schedule(run.cfg.diffusion.schedule, run.cfg.diffusion.eps),
                  time_agnostic=not run.cfg.model.time_conditioning, batch_size=args.batch_size, device=run.device)
    unigram = ht.train_unigram(data)
    judge_nll = judge_test_nll(judge_run, test, args.judge_test_rows)
    print(f"  {judge_nll:.4f} nats/char; {len(test)} test rows; S_max = {s_max}, {args.steps} steps")

    result = {}
    if args.infill:
        setup = ht.infill_setup(test, args.infill, model.mask_id, temperature=0.0, **common)
        result["infill"] = ht.run_measure(setup, model, loops, rules, args.granularity, mdm_model, unigram,
                                          oracle=True, resamples=args.resamples)
        if args.timing_rows > 0 and args.timing_repeats > 0:
            timed = [ht.timed_setting(result["infill"])] + extra_timed
            result["token_timing"] = []
            for rule, tau in dict.fromkeys(t for t in timed if t is not None):
                print(f"  timing per-token halting {rule} tau={tau:g} against dense S = {s_max} "
                      f"({min(args.timing_rows, args.infill)} rows, median of {args.timing_repeats})")
                result["token_timing"].append(ht.token_timing(setup.subset(args.timing_rows), model, rule, tau,
                                                              repeats=args.timing_repeats))
        result["examples"] = example_texts(result, run.tokenizer, model.mask_id)
    if args.samples:
        setup = ht.samples_setup(test, args.samples, model.mask_id, temperature=1.0, **common)
        # no oracle here: at temperature 1 the committed token is a draw, not the argmax it compares
        result["samples"] = ht.run_measure(setup, model, loops, rules, args.granularity, mdm_model, unigram,
                                           oracle=False, resamples=args.resamples)
    result.update(
        weights=weights, mdm_weights=mdm_weights, judge_weights=judge_weights, judge_test_nll=judge_nll,
        n_test_rows=len(test), notes=notes,
        settings={"run": args.run, "mdm": args.mdm or None, "judge": args.judge, "infill": args.infill,
                  "samples": args.samples, "steps": args.steps, "seed": args.seed, "s_max": s_max, "loops": loops,
                  "rules": [[r, t] for r, t in rules], "granularity": args.granularity,
                  "timing_rows": args.timing_rows, "timing_repeats": args.timing_repeats,
                  "timing_rules": [list(t) for t in extra_timed],
                  "judge_test_rows": args.judge_test_rows, "resamples": args.resamples,
                  "batch_size": args.batch_size, "device": str(run.device), "threads": torch.get_num_threads(),
                  "split": "test"},
        machine=f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}, "
                f"{torch.cuda.get_device_name() if run.device.type == 'cuda' else f'{torch.get_num_threads()} thread(s)'}",
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        command=" ".join(shlex.quote(a) for a in ["benchmarks/halting_text.py", *(sys.argv[1:] if argv is None else argv)]),
        seconds=time.perf_counter() - started)
    write_outputs(result, out)
    print(f"wrote {out}/halting_text.json, .md, calls.npz and three plots ({result['seconds']:.0f} s)")
    return 0


def write_outputs(result: dict, out: Path) -> None:
    """The rows' raw per-call logs and tokens go to calls.npz (compact); the JSON keeps the rest."""
    arrays = {}
    for key in ("infill", "samples"):
        for i, row in enumerate(result.get(key, {}).get("rows", [])):
            for name, values in row.pop("calls", {}).items():
                arrays[f"{key}:{i}:{row['label']}:{name}"] = np.asarray(values)
            tokens = row.pop("tokens", None)
            if tokens is not None:
                arrays[f"{key}:{i}:{row['label']}:tokens"] = np.asarray(tokens, dtype=np.uint16)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_file(out / "calls.npz", buf.getvalue())
    write_file(out / "halting_text.json", json.dumps(result, indent=1, default=str) + "\n")
    write_file(out / "halting_text.md", markdown(result))
    write_plots(result, out)


if __name__ == "__main__":
    run_script(main)
