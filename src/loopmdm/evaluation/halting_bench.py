"""Adaptive halting where the loop matters: task solving under a restricted decoding order
(benchmarks/halting_solve.py; issue 19).

A Sudoku LoopMDM decoding one blank per call in raster order has to do its deduction inside
the call, so its solve rate rises with the loop count S. Here the same puzzles are decoded by

* **fixed S** -- `LoopRunner` without halting, at each S;
* **halting rules** -- `LoopRunner` with a `Halting` rule (sampling/halting.py) capped at S_max,
  each row halting on its own (granularity ``sequence`` by default: a per-call mean would let
  one row's convergence decide for another's);
* **the oracle** (`OracleDenoiser`) -- training-free and not realisable: for each row and call,
  the fewest iterations k <= S_max whose argmax at the position(s) being decoded already equals
  the argmax at S_max. It decodes with the S_max prediction, so its quality is fixed S_max's by
  construction, and its mean k is the ceiling of any halting rule at equal quality;
* **the MDM** -- one call per step, no loop (a comparison row).

Every denoiser keeps `records` of `CallRecord`s (the runner's own), and `CallLog` adds what
each row saw: which puzzle, t (the fraction of its blanks still masked), its decode step.
The statistics over the rows (paired s.e., "matches", saving, bootstrap band) are in
evaluation/halting_stats.py.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from loopmdm import checkpoint as ckpt
from loopmdm.errors import require
from loopmdm.evaluation import halting_stats as hs
from loopmdm.sampling.halting import HALT_RULES, Halting
from loopmdm.sampling.infill import fill_blanks
from loopmdm.evaluation.solve import score, scoring_of
from loopmdm.runs import load_run
from loopmdm.sampling.loop_runner import CallRecord, LoopRunner


def open_run(path: str, device: str, notes: list[str]):
    """The run's best-validation weights when it has them (the data-scarce suites select on
    validation), else its newest checkpoint, saying so in `notes`."""
    if ckpt.read_best_info(path) is not None:
        run = load_run(path, device=device, best=True)
        return run, f"best-validation weights, step {run.step}"
    run = load_run(path, device=device)
    notes.append(f"{path} has no best-validation weights; used its newest checkpoint (step {run.step})")
    return run, f"newest checkpoint, step {run.step}"


def open_loop_and_mdm(run_path: str, mdm_path: str, device: str, notes: list[str]):
    """(run, its weights' label, the MDM's model or None, its weights' label or None): the
    looped run under test and the optional --mdm run beside it, on the same vocabulary and length."""
    run, weights = open_run(run_path, device, notes)
    require(run.model.is_looped, f"'{run_path}' is not a looped run (no model.loop_start/loop_end); pass it as --mdm")
    if not mdm_path:
        return run, weights, None, None
    mdm, mdm_weights = open_run(mdm_path, device, notes)
    require(mdm.cfg.model.vocab_size == run.cfg.model.vocab_size and mdm.cfg.data.seq_len == run.cfg.data.seq_len,
            f"--mdm '{mdm_path}' has vocabulary {mdm.cfg.model.vocab_size} and length {mdm.cfg.data.seq_len}, "
            f"the run {run.cfg.model.vocab_size} and {run.cfg.data.seq_len}: not the same data")
    if mdm.model.is_looped:
        notes.append(f"--mdm {mdm_path} is a looped model: its row is that model at S = 1")
    return run, weights, mdm.model, mdm_weights


def parse_loops(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4] (the --loops option)."""
    try:
        loops = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        loops = []
    require(loops and all(s >= 1 for s in loops), f"--loops '{text}' must list integers >= 1")
    return loops


# --------------------------------------------------------------------------- the oracle

def decoded_positions(logits: torch.Tensor, masked: torch.Tensor, order: str) -> torch.Tensor:
    """(B, L) bool: the positions `fill_blanks` commits from these logits (already restricted to
    the answer symbols) -- the ones whose prediction the oracle compares across iterations."""
    if order == "oneshot":
        return masked
    if order == "raster":
        pos = masked.float().argmax(1)
    else:  # confidence (without blocks): the most confident blank
        probs = logits.softmax(-1).max(-1).values
        pos = torch.where(masked, probs, torch.full_like(probs, -1.0)).argmax(1)
    one = torch.zeros_like(masked)
    one[torch.arange(len(pos), device=pos.device), pos] = True
    return one & masked


@dataclass
class OracleDenoiser:
    """The samplers' signature; returns the S_max logits and records, per row, the smallest k
    whose argmax at the decoded position(s) equals S_max's (`row_loops`), and the smallest k
    from which it never changes again (`settled`, a stricter ceiling: a rule that reads
    convergence cannot stop inside a flip-flop). One pass: the loop runs to S_max once and the
    coda reads every H^k."""

    model: torch.nn.Module
    s_max: int
    order: str = "raster"
    num_symbols: int | None = None
    records: list = field(default_factory=list)
    settled: list = field(default_factory=list)  # per call: (B,) list of the settled k

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, num_loops: int, t: torch.Tensor) -> torch.Tensor:
        model = self.model
        c = model.condition(t, x.shape[0], x.device)
        h0 = model.run_prelude(x, c)
        preds = []
        for h in model.iterate_loop(h0, c, None, self.s_max):
            logits = model.run_coda(h, c).float()
            preds.append(logits[..., :self.num_symbols].argmax(-1))
        decoded = decoded_positions(logits[..., :self.num_symbols], x == model.mask_id, self.order)
        # agree[b, k-1]: iteration k predicts S_max's tokens at every decoded position of row b
        agree = torch.stack([((p == preds[-1]) | ~decoded).all(1) for p in preds], dim=1)
        first = agree.float().argmax(1) + 1  # k = S_max always agrees, so one exists
        tail = agree.flip(1).int().cumprod(1).sum(1)  # how many final iterations all agree
        self.records.append(CallRecord(loops=self.s_max, row_loops=[float(k) for k in first],
                                       flops=0.0, active_flops=0.0))
        self.settled.append([float(self.s_max - n + 1) for n in tail])
        return logits


# --------------------------------------------------------------------------- decoding with a log

@dataclass
class CallLog:
    """Wraps a recording denoiser: after each call, one entry per row that still had blanks
    (finished rows ride along in the batch, but their loops decide nothing)."""

    denoiser: object
    mask_id: int
    offset: int = 0  # puzzle index of the batch's first row
    blanks0: torch.Tensor | None = None  # (B,) blanks of each row at the start
    puzzle: list = field(default_factory=list)
    loops: list = field(default_factory=list)
    t: list = field(default_factory=list)
    step: list = field(default_factory=list)
    settled: list = field(default_factory=list)

    def start_batch(self, x: torch.Tensor, offset: int) -> None:
        self.offset, self.blanks0 = offset, (x == self.mask_id).sum(1)

    def __call__(self, x: torch.Tensor, num_loops: int, t: torch.Tensor) -> torch.Tensor:
        out = self.denoiser(x, num_loops, t)
        left = (x == self.mask_id).sum(1)
        row_loops = self.denoiser.records[-1].row_loops
        settled = getattr(self.denoiser, "settled", None)
        for b in torch.nonzero(left > 0).flatten().tolist():
            self.puzzle.append(self.offset + b)
            self.loops.append(float(row_loops[b]))
            self.t.append(float(left[b]) / float(self.blanks0[b]))
            self.step.append(int(self.blanks0[b] - left[b]))
            if settled:
                self.settled.append(settled[-1][b])
        return out


def per_example(test: dict, filled: np.ndarray, mask_id: int, key: str) -> np.ndarray:
    """The headline score of each example alone (e.g. 1/0 solved per puzzle), so rows can be
    compared puzzle by puzzle."""
    n = len(test["x"])
    values = []
    for i in range(n):
        one = {k: (v[i:i + 1] if isinstance(v, np.ndarray) and len(v) == n else v) for k, v in test.items()}
        values.append(float(score(one, filled[i:i + 1], mask_id)[key]))
    return np.asarray(values)


@dataclass
class Setup:
    """What every row shares: the puzzles, how they are decoded and scored."""

    test: dict
    mask_id: int
    order: str
    num_symbols: int | None
    s_max: int
    batch_size: int = 256
    device: torch.device | str = "cpu"

    @property
    def key(self) -> str:
        return scoring_of(self.test["task"]).headline[0]


def decode(setup: Setup, denoiser, num_loops: int) -> tuple[np.ndarray, CallLog, float]:
    """(filled rows, the call log, seconds) for every puzzle of the setup."""
    log = CallLog(denoiser, setup.mask_id)
    filled = []
    start = time.perf_counter()
    for lo in range(0, len(setup.test["x"]), setup.batch_size):
        x = torch.as_tensor(setup.test["x"][lo:lo + setup.batch_size], device=setup.device)
        log.start_batch(x, lo)
        out = fill_blanks(log, x, setup.mask_id, setup.order, num_loops, setup.num_symbols)
        filled.append(out.tokens.cpu().numpy())
    if torch.device(setup.device).type == "cuda":
        torch.cuda.synchronize()
    return np.concatenate(filled), log, time.perf_counter() - start


def measure(setup: Setup, denoiser, num_loops: int, **label) -> dict:
    """One row: quality (aggregate and per puzzle), loops per row-call with what each call saw,
    FLOPs, seconds."""
    filled, log, seconds = decode(setup, denoiser, num_loops)
    scores = score(setup.test, filled, setup.mask_id)
    n = len(setup.test["x"])
    puzzle = np.asarray(log.puzzle, dtype=np.int64)
    loops = np.asarray(log.loops)
    records = denoiser.records
    cells = max(len(log.loops), 1)  # decoded blanks (raster / confidence: one per row-call)
    row = {**label, "solved": scores[setup.key], "cell_acc": scores.get("cell_acc"), "n": n,
           "mean_loops": float(loops.mean()) if len(loops) else 0.0,
           "per_puzzle_solved": per_example(setup.test, filled, setup.mask_id, setup.key).tolist(),
           "per_puzzle_loop_sum": np.bincount(puzzle, weights=loops, minlength=n).tolist(),
           "per_puzzle_calls": np.bincount(puzzle, minlength=n).tolist(),
           "calls": {"loops": log.loops, "t": log.t, "step": log.step},
           "flops_per_cell": sum(r.flops for r in records) / cells,
           "active_flops_per_cell": sum(r.active_flops for r in records) / cells,
           "seconds": seconds}
    if log.settled:
        row["settled_loops"] = float(np.mean(log.settled))
        row["calls"]["settled"] = log.settled
    return row


# --------------------------------------------------------------------------- the rows

def min_loops_for(rule: str) -> int:
    """Rules that read the prediction compare it with the previous iteration's, and the first
    comparison (H^1 against the prelude's state through the coda) can show no change before
    the loop has done anything (halting.py, `flips`): they start deciding at k = 2."""
    return 2 if HALT_RULES[rule].needs_logits else 1


# `measure_fn` lets the text benchmark (halting_text.py) build the same rows with its own measure.
def fixed_row(setup: Setup, model, loops: int, measure_fn=None) -> dict:
    return (measure_fn or measure)(setup, LoopRunner(model), loops, kind="fixed", label=f"S = {loops}", S=loops)


def rule_row(setup: Setup, model, rule: str, tau: float, granularity: str = "sequence", measure_fn=None) -> dict:
    halting = Halting(tau, min_loops_for(rule), granularity, rule, cap=setup.s_max)
    return (measure_fn or measure)(setup, LoopRunner(model, halting=halting), setup.s_max, kind="rule",
                                   label=f"{rule} tau={tau:g}", rule=rule, tau=tau, granularity=granularity,
                                   min_loops=halting.min_loops)


def oracle_row(setup: Setup, model) -> dict:
    oracle = OracleDenoiser(model, setup.s_max, setup.order, setup.num_symbols)
    return measure(setup, oracle, setup.s_max, kind="oracle", label="oracle")


def mdm_row(setup: Setup, mdm_model, measure_fn=None) -> dict:
    return (measure_fn or measure)(setup, LoopRunner(mdm_model), 1, kind="mdm", label="MDM")


def time_token_halting(setup, model, rule: str, tau: float, repeats: int, decode_fn) -> tuple[dict, np.ndarray, np.ndarray]:
    """Per-token halting (`loop_step_at` skips the frozen positions) against dense fixed S_max on
    the same rows: wall time (median of `repeats`, interleaved so drift from other jobs hits both
    alike), and FLOPs computed vs the active FLOPs the runner counts. `decode_fn(setup, runner,
    loops)` -> (output, call log, seconds) is the benchmark's decoder; returns (the timing row,
    the token arm's output, the dense arm's output) so the caller scores both its own way."""
    halting = Halting(tau, min_loops_for(rule), "token", rule, cap=setup.s_max)
    times = {"dense": [], "token": []}
    runs = {}
    for _ in range(repeats):
        for name, runner in (("dense", LoopRunner(model)), ("token", LoopRunner(model, halting=halting))):
            output, log, seconds = decode_fn(setup, runner, setup.s_max)
            times[name].append(seconds)
            runs[name] = (output, runner, log)
    dense_flops = sum(r.flops for r in runs["dense"][1].records)
    dense_s, token_s = statistics.median(times["dense"]), statistics.median(times["token"])
    row = {"rule": rule, "tau": tau, "granularity": "token", "repeats": repeats,
           "dense_seconds": dense_s, "token_seconds": token_s, "time_ratio": token_s / dense_s,
           "active_flops_ratio": sum(r.active_flops for r in runs["token"][1].records) / dense_flops,
           "computed_flops_ratio": sum(r.flops for r in runs["token"][1].records) / dense_flops,
           # token granularity: a row-call's loops are the mean over its positions
           "mean_loops": float(np.mean(runs["token"][2].loops))}
    return row, runs["token"][0], runs["dense"][0]


def token_timing(setup: Setup, model, rule: str, tau: float, repeats: int = 3) -> dict:
    """Per-token halting on the setup's puzzles (time_token_halting), with its solve rate."""
    row, filled, _ = time_token_halting(setup, model, rule, tau, repeats, decode)
    return {**row, "solved": score(setup.test, filled, setup.mask_id)[setup.key],
            "per_puzzle_solved": per_example(setup.test, filled, setup.mask_id, setup.key).tolist()}


# --------------------------------------------------------------------------- the whole benchmark

def add_halting_options(p, default_rules: str, unit: str) -> None:
    """The options every halting benchmark shares (benchmarks/halting_solve.py, halting_text.py);
    `unit` names what halts on its own at sequence granularity (puzzle, row)."""
    from loopmdm.sampling.halting import GRANULARITIES

    p.add_argument("--s-max", type=int, default=0, help="the reference S and every rule's cap (default: the run's "
                                                        "model.max_train_loops)")
    p.add_argument("--loops", default="1,2,3,4,6,8,12,16", help="fixed S values (S_max is added)")
    p.add_argument("--rules", default=default_rules, help="'RULE:TAU,TAU;RULE:TAU' (sampling/halting.py HALT_RULES)")
    p.add_argument("--granularity", default="sequence", choices=GRANULARITIES,
                   help=f"halting granularity of the rule rows (sequence: each {unit} halts on its own)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the saving's band")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: shared machine)")


def parse_rule_taus(text: str) -> list[tuple[str, list[float]]]:
    """'change-scaled:0.05,0.1;kl:1e-3' -> [(rule, [tau, ...])]. Rules are separated by ';'
    (or ','), thresholds by ',' or ':' -- so sample-bench's 'RULE:TAU:TAU,RULE:TAU' reads too:
    a part that does not start with a rule name is one more threshold of the rule before it."""
    out: list[tuple[str, list[float]]] = []
    for part in (p.strip() for p in str(text).replace(";", ",").split(",") if p.strip()):
        head, *rest = part.split(":")
        if head in HALT_RULES:
            out.append((head, []))
            values = rest
        else:
            require(out, f"--rules: '{part}' is not a halting rule; choose one of: {', '.join(HALT_RULES)}")
            values = [head, *rest]
        for v in values:
            try:
                tau = float(v)
            except ValueError:
                tau = float("nan")
            require(math.isfinite(tau) and tau > 0, f"--rules: threshold '{v}' of {out[-1][0]} must be a number > 0")
            out[-1][1].append(tau)
    for rule, taus in out:
        require(taus, f"--rules: {rule} needs one or more thresholds, e.g. '{rule}:0.1,0.05'")
    return out


def plotted_settings(rows: list[dict], savings_: dict) -> list[str]:
    """One setting per rule for the loops-against-t plot: its best matching one, else its
    middle threshold."""
    out = []
    for rule in dict.fromkeys(r["rule"] for r in rows if r["kind"] == "rule"):
        label = savings_.get(rule, {}).get("label")
        if label is None:
            mine = [r["label"] for r in rows if r.get("rule") == rule]
            label = mine[len(mine) // 2]
        out.append(label)
    return out


def timed_setting(rows: list[dict], savings_: dict, measure: hs.Measure = hs.SOLVED) -> tuple[str, float] | None:
    """The rule with the largest saving at its best matching threshold; if no rule matches, the
    rule setting best on `measure` (fewest loops among ties)."""
    rules = [(sv["saving"], g) for g, sv in savings_.items() if g not in ("fixed", "oracle") and sv["saving"]]
    if rules:
        label = savings_[max(rules)[1]]["label"]
        row = next(r for r in rows if r["label"] == label)
    else:
        cands = [r for r in rows if r["kind"] == "rule"]
        if not cands:
            return None
        row = max(cands, key=lambda r: (measure.sign * r[measure.name], -r["mean_loops"]))
    return row["rule"], row["tau"]


def benchmark(setup: Setup, model, loops: list[int], rules: list[tuple[str, list[float]]],
              granularity: str = "sequence", mdm_model=None, timing_repeats: int = 3,
              resamples: int = 1000, say=print) -> dict:
    """Every row of the benchmark on `setup`'s puzzles, compared with fixed S_max: fixed S at
    each of `loops` (S_max added), each rule at each threshold, the oracle, the MDM; savings
    with their bootstrap bands; per-token halting's wall time for the best rule."""
    model.eval()
    rows = []

    def add(row):
        hs.summarise_calls(row)
        rows.append(row)
        say(f"  {row['label']:<28} loops {row['mean_loops']:5.2f}  solved {row['solved']:.3f}  ({row['seconds']:.1f} s)")

    for s in sorted(set(loops) | {setup.s_max}):
        add(fixed_row(setup, model, s))
    for rule, taus in rules:
        for tau in taus:
            add(rule_row(setup, model, rule, tau, granularity))
    add(oracle_row(setup, model))
    if mdm_model is not None:
        mdm_model.eval()
        add(mdm_row(setup, mdm_model))
    ref = next(r for r in rows if r["kind"] == "fixed" and r["S"] == setup.s_max)
    hs.compare_to(rows, ref)
    savings_ = hs.savings(rows, setup.s_max)
    result = {"rows": rows, "reference": ref["label"], "savings": savings_,
              "saving_bands": hs.bootstrap_savings(rows, ref, setup.s_max, resamples=resamples),
              "plotted_settings": plotted_settings(rows, savings_), "notes": []}
    fewest = min((r for r in rows if r["kind"] == "fixed"), key=lambda r: r["S"])
    if fewest["matches"] and fewest["S"] < setup.s_max:
        # Then any rule "matches" at any loop count: a saving read off here is no evidence.
        result["notes"].append(f"quality is flat in S here ({fewest['label']} matches the reference): "
                               "the savings in this report say nothing about halting")
    timed = timed_setting(rows, savings_) if timing_repeats > 0 else None
    if timed is not None:
        say(f"  timing per-token halting {timed[0]} tau={timed[1]:g} against dense S = {setup.s_max} "
            f"(median of {timing_repeats})")
        tt = token_timing(setup, model, *timed, repeats=timing_repeats)
        tt["diff_vs_ref"] = tt["solved"] - ref["solved"]
        tt["se_vs_ref"] = hs.paired_se(tt["per_puzzle_solved"], ref["per_puzzle_solved"])
        result["token_timing"] = tt
    return result
