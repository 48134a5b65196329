"""Adaptive halting on character-level text: quality against mean loops per row-call
(benchmarks/halting_text.py; issue 19).

The Sudoku benchmark (evaluation/halting_bench.py) decodes one blank per call; here a text
LoopMDM denoises with MDLM's ancestral sampler at a fixed number of steps, so a call commits a
random handful of positions per row. Two measures, every row of the table on the same test rows
with the same seed (and so the same unmasking positions at the same steps: they are drawn
before the prediction is read, so every model and loop setting commits the same positions):

* **infill** (primary) -- N held-out test rows spread over the split, the middle half masked and
  filled greedily (temperature 0): per row the exact-character accuracy of the fill and the
  judge's NLL of the fill and the text after it given the text before it (nats/char; an
  autoregressive model trained here, evaluation/judge.py);
* **samples** -- M unconditional samples (temperature 1, the same Gumbel draws for every row of
  the table): per sample the judge's NLL (generative perplexity) and its unigram entropy.

Rows: fixed S, each halting rule (capped at S_max, each row halting on its own), the
training-free oracle (infill only: the fewest iterations whose argmax at the positions the step
commits equals S_max's -- greedy decoding commits exactly that argmax, so its tokens are fixed
S_max's by construction), an MDM, and references without a model: the test text itself and
i.i.d. draws from the train split's unigram. The statistics are halting_stats.py's, with a
`Measure` per score (a setting matches S_max when it does on every score of the measure).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from loopmdm.data.prepared import UNIGRAM_FILE
from loopmdm.errors import require
from loopmdm.evaluation import halting_stats as hs
from loopmdm.evaluation import halting_bench as hb
from loopmdm.evaluation.halting_bench import plotted_settings
from loopmdm.evaluation.halting_bench import timed_setting as _timed_setting
from loopmdm.evaluation.judge import unigram_entropy
from loopmdm.evaluation.sample_bench import reference_rows  # noqa: F401 (re-exported for the script)
from loopmdm.sampling.loop_runner import CallRecord
from loopmdm.sampling.samplers import sample

ACC = hs.Measure("acc", "per_row_acc")
JUDGE_NLL = hs.Measure("judge_nll", "per_row_judge_nll", higher_is_better=False)
MEASURES = {"infill": (ACC, JUDGE_NLL), "samples": (JUDGE_NLL,)}


# --------------------------------------------------------------------------- what every row shares

@dataclass
class TextSetup:
    """One measure's inputs: the templates every row denoises and how."""

    kind: str  # "infill" or "samples"
    truth: np.ndarray  # (N, L) the held-out rows (samples: the test-text reference rows)
    template: np.ndarray  # (N, L) with mask_id where the model fills in
    mask_id: int
    steps: int
    temperature: float
    seed: int
    s_max: int
    schedule: object  # diffusion/schedule.py NoiseSchedule of the run
    judge: torch.nn.Module | None = None
    time_agnostic: bool = True
    batch_size: int = 64
    device: torch.device | str = "cpu"

    @property
    def scored_from(self) -> int:
        """First position whose judge NLL is scored: infill, the fill and the text after it
        (the prefix is the same in every row); samples, every token but the first."""
        return self.truth.shape[1] // 4 if self.kind == "infill" else 1

    @property
    def measures(self) -> tuple:
        return MEASURES[self.kind]

    def subset(self, n: int) -> "TextSetup":
        return replace(self, truth=self.truth[:n], template=self.template[:n])


def infill_setup(test_blocks, num: int, mask_id: int, **kw) -> TextSetup:
    """`num` test rows spread over the split (sample_bench.reference_rows), middle half masked."""
    truth = np.asarray(reference_rows(test_blocks, num), dtype=np.int64)
    L = truth.shape[1]
    template = truth.copy()
    template[:, L // 4: L - L // 4] = mask_id
    return TextSetup("infill", truth, template, mask_id, **kw)


def samples_setup(test_blocks, num: int, mask_id: int, **kw) -> TextSetup:
    truth = np.asarray(reference_rows(test_blocks, num), dtype=np.int64)
    return TextSetup("samples", truth, np.full_like(truth, mask_id), mask_id, **kw)


def train_unigram(prepared) -> np.ndarray:
    """The train split's unigram distribution (data/prepare.py's counts of the whole train split)."""
    path = prepared.path / UNIGRAM_FILE
    require(path.is_file(), f"'{path}' is missing: the unigram row needs the train split's counts (prepare again)")
    counts = np.load(path).astype(np.float64)
    require(counts.sum() > 0, f"'{path}' holds no counts")
    return counts / counts.sum()


# --------------------------------------------------------------------------- the oracle

@dataclass
class CommitOracle:
    """The samplers' signature; returns the S_max logits. Per row and call it records the fewest
    iterations k whose argmax, at the positions the sampler then commits, equals S_max's
    (`row_loops`; a call that commits nothing in a row needs 1), and the k from which the
    argmax never changes again (`settled`). The committed positions are known only after the
    step: `resolve(x_before, x_after)` (called by `TextCallLog`) reads them. Under greedy
    decoding the committed tokens are exactly S_max's argmax, so k is the fewest loops that
    commit S_max's tokens; at temperature > 0 it is only argmax agreement."""

    model: torch.nn.Module
    s_max: int
    records: list = field(default_factory=list)
    settled: list = field(default_factory=list)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, num_loops: int, t: torch.Tensor) -> torch.Tensor:
        model = self.model
        c = model.condition(t, x.shape[0], x.device)
        preds = []
        for h in model.iterate_loop(model.run_prelude(x, c), c, None, self.s_max):
            logits = model.run_coda(h, c).float()
            preds.append(logits.argmax(-1))
        self._preds = torch.stack(preds, dim=1)  # (B, K, L)
        return logits

    def resolve(self, x_before: torch.Tensor, x_after: torch.Tensor) -> None:
        committed = (x_before == self.model.mask_id) & (x_after != self.model.mask_id)  # (B, L)
        agree = ((self._preds == self._preds[:, -1:]) | ~committed[:, None]).all(-1)  # (B, K)
        first = agree.float().argmax(1) + 1  # k = S_max always agrees
        tail = agree.flip(1).int().cumprod(1).sum(1)
        self.records.append(CallRecord(loops=self.s_max, row_loops=[float(k) for k in first], flops=0.0,
                                        active_flops=0.0))
        self.settled.append([float(self.s_max - n + 1) for n in tail])


# --------------------------------------------------------------------------- sampling with a log

@dataclass
class TextCallLog:
    """Wraps a recording denoiser and the sampler's step callback: after each step, one entry per
    row that had masked positions at the call -- which row, its loops, t (the fraction of its
    initially masked positions still masked), the sampler step, and how many positions the step
    committed in it."""

    denoiser: object
    mask_id: int
    offset: int = 0
    blanks0: torch.Tensor | None = None
    example: list = field(default_factory=list)
    loops: list = field(default_factory=list)
    t: list = field(default_factory=list)
    step: list = field(default_factory=list)
    committed: list = field(default_factory=list)
    settled: list = field(default_factory=list)

    def __post_init__(self):
        self._pending = None

    def start_batch(self, x: torch.Tensor, offset: int) -> None:
        self.offset, self.blanks0, self._pending = offset, (x == self.mask_id).sum(1).clamp(min=1), None

    def __call__(self, x: torch.Tensor, num_loops: int, t: torch.Tensor) -> torch.Tensor:
        out = self.denoiser(x, num_loops, t)
        self._pending = x.clone()  # the sampler changes x in place after the call
        return out

    def stepped(self, i: int, x_after: torch.Tensor) -> None:
        if self._pending is None:  # sample() reports the final tokens without a call
            return
        x, self._pending = self._pending, None
        if hasattr(self.denoiser, "resolve"):
            self.denoiser.resolve(x, x_after)
        row_loops = self.denoiser.records[-1].row_loops
        settled = getattr(self.denoiser, "settled", None)
        masked = x == self.mask_id
        left = masked.sum(1)
        new = (masked & (x_after != self.mask_id)).sum(1)
        for b in torch.nonzero(left > 0).flatten().tolist():
            self.example.append(self.offset + b)
            self.loops.append(float(row_loops[b]))
            self.t.append(float(left[b]) / float(self.blanks0[b]))
            self.step.append(int(i))
            self.committed.append(int(new[b]))
            if settled:
                self.settled.append(settled[-1][b])


def decode(setup: TextSetup, denoiser, num_loops: int) -> tuple[np.ndarray, TextCallLog, float]:
    """(tokens, the call log, seconds): every template of the setup, batch by batch, from one
    generator seeded with setup.seed (so every row of a table sees the same draws)."""
    log = TextCallLog(denoiser, setup.mask_id)
    generator = torch.Generator(device="cpu").manual_seed(setup.seed)
    out = []
    start = time.perf_counter()
    for lo in range(0, len(setup.template), setup.batch_size):
        x = torch.as_tensor(setup.template[lo:lo + setup.batch_size], device=setup.device)
        log.start_batch(x, lo)
        result = sample(log, mask_id=setup.mask_id, x_init=x, steps=setup.steps, loops=num_loops,
                        sampler="ancestral", schedule=setup.schedule, temperature=setup.temperature,
                        generator=generator, time_agnostic=setup.time_agnostic, on_step=log.stepped)
        out.append(result.tokens.cpu().numpy())
    if torch.device(setup.device).type == "cuda":
        torch.cuda.synchronize()
    return np.concatenate(out), log, time.perf_counter() - start


# --------------------------------------------------------------------------- scores

@torch.no_grad()
def judge_token_nll(judge, tokens: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """(N, L - 1): the judge's NLL of token j + 1 given tokens 0..j (evaluation/judge.py's loss,
    kept per position)."""
    require(getattr(getattr(judge, "cfg", None), "causal", False),
            "the judge must be a causal model (a run trained with model.causal=true)")
    judge.eval()
    device = next(judge.parameters()).device
    out = []
    for lo in range(0, len(tokens), batch_size):
        x = torch.as_tensor(np.array(tokens[lo:lo + batch_size], dtype=np.int64), device=device)  # a copy: test blocks are a read-only memmap
        logits = judge(x, num_loops=1).float()
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")
        out.append(nll.cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def scores(setup: TextSetup, tokens: np.ndarray) -> dict:
    """Per-row scores of filled rows / samples and their means (the aggregate of each measure
    is the mean over rows, so the bootstrap's resampled aggregates are the same statistic)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    out: dict = {"n": len(tokens)}
    if setup.judge is not None:
        per_row = judge_token_nll(setup.judge, tokens)[:, setup.scored_from - 1:].mean(1)
        out.update(judge_nll=float(per_row.mean()), per_row_judge_nll=per_row.tolist(),
                   gen_ppl=float(np.exp(per_row.mean())))
    if setup.kind == "infill":
        blank = setup.template == setup.mask_id
        per_row = ((tokens == setup.truth) & blank).sum(1) / np.maximum(blank.sum(1), 1)
        out.update(acc=float(per_row.mean()), per_row_acc=per_row.tolist())
    # unigram entropy of what the model wrote (infill: the filled span; samples: the whole row)
    span = (setup.template == setup.mask_id)
    ents = [unigram_entropy(torch.as_tensor(row[keep][None])) for row, keep in zip(tokens, span)]
    out.update(entropy=float(np.mean(ents)), per_row_entropy=ents)
    return out


def measure(setup: TextSetup, denoiser, num_loops: int, **label) -> dict:
    """One row: its scores (aggregate and per row), loops per row-call with what each call saw,
    FLOPs per generated token, seconds."""
    tokens, log, seconds = decode(setup, denoiser, num_loops)
    n = len(setup.template)
    example = np.asarray(log.example, dtype=np.int64)
    loops = np.asarray(log.loops)
    generated = max(int((setup.template == setup.mask_id).sum()), 1)
    records = denoiser.records
    row = {**label, **scores(setup, tokens),
           "mean_loops": float(loops.mean()) if len(loops) else 0.0,
           "per_puzzle_loop_sum": np.bincount(example, weights=loops, minlength=n).tolist(),
           "per_puzzle_calls": np.bincount(example, minlength=n).tolist(),
           "calls": {"example": log.example, "loops": log.loops, "t": log.t, "step": log.step,
                     "committed": log.committed},
           "flops_per_token": sum(r.flops for r in records) / generated,
           "active_flops_per_token": sum(r.active_flops for r in records) / generated,
           "seconds": seconds, "tokens": tokens}
    if log.settled:
        row["settled_loops"] = float(np.mean(log.settled))
        row["calls"]["settled"] = log.settled
    return row


def reference_row(setup: TextSetup, tokens: np.ndarray, **label) -> dict:
    """A row without a model (test text, unigram draws): scores only, no loops."""
    return {**label, "kind": "reference", **scores(setup, tokens), "mean_loops": 0.0, "tokens": np.asarray(tokens)}


def unigram_tokens(setup: TextSetup, unigram: np.ndarray, seed: int) -> np.ndarray:
    """The templates with every masked position drawn i.i.d. from `unigram`."""
    rng = np.random.default_rng(seed)
    out = setup.template.copy()
    blank = out == setup.mask_id
    out[blank] = rng.choice(len(unigram), size=int(blank.sum()), p=unigram)
    return out


# --------------------------------------------------------------------------- the rows

fixed_row = partial(hb.fixed_row, measure_fn=measure)  # the Sudoku benchmark's rows, measured on text
rule_row = partial(hb.rule_row, measure_fn=measure)
mdm_row = partial(hb.mdm_row, measure_fn=measure)


def oracle_row(setup: TextSetup, model) -> dict:
    return measure(setup, CommitOracle(model, setup.s_max), setup.s_max, kind="oracle", label="oracle")


def token_timing(setup: TextSetup, model, rule: str, tau: float, repeats: int = 3) -> dict:
    """Per-token halting against dense fixed S_max on the same rows and draws
    (hb.time_token_halting), with both arms' scores, paired."""
    out, tokens, dense_tokens = hb.time_token_halting(setup, model, rule, tau, repeats, decode)
    token, dense = scores(setup, tokens), scores(setup, dense_tokens)
    out["n"] = len(setup.template)
    for m in setup.measures:
        out[m.name] = token[m.name]
        out[f"{m.name}_dense"] = dense[m.name]
        out[f"{m.name}_diff"] = token[m.name] - dense[m.name]
        out[f"{m.name}_se"] = hs.paired_se(token[m.per_example], dense[m.per_example])
    return out


# --------------------------------------------------------------------------- one measure, every row

def run_measure(setup: TextSetup, model, loops: list[int], rules: list[tuple[str, list[float]]],
                granularity: str = "sequence", mdm_model=None, unigram: np.ndarray | None = None,
                oracle: bool = True, resamples: int = 1000, say=print) -> dict:
    """Every row of one measure, compared with fixed S_max on the same rows: fixed S at each of
    `loops` (S_max added), each rule at each threshold, the oracle, the MDM, and the references
    (test text, unigram draws); savings with their bootstrap bands."""
    model.eval()
    rows = []

    def add(row, calls=True):
        if calls:
            hs.summarise_calls(row)
        rows.append(row)
        q = "  ".join(f"{m.name} {row[m.name]:.4f}" for m in setup.measures if m.name in row)
        say(f"  [{setup.kind}] {row['label']:<24} loops {row['mean_loops']:5.2f}  {q}  ({row.get('seconds', 0):.1f} s)")

    for s in sorted(set(loops) | {setup.s_max}):
        add(fixed_row(setup, model, s))
    for rule, taus in rules:
        for tau in taus:
            add(rule_row(setup, model, rule, tau, granularity))
    if oracle:
        add(oracle_row(setup, model))
    if mdm_model is not None:
        mdm_model.eval()
        add(mdm_row(setup, mdm_model))
    add(reference_row(setup, setup.truth, label="test text"), calls=False)
    if unigram is not None:
        add(reference_row(setup, unigram_tokens(setup, unigram, setup.seed), label="train unigram"), calls=False)
    ref = next(r for r in rows if r["kind"] == "fixed" and r["S"] == setup.s_max)
    hs.compare_to(rows, ref, setup.measures)
    savings_ = hs.savings(rows, setup.s_max)
    result = {"kind": setup.kind, "rows": rows, "reference": ref["label"], "measures": [m.name for m in setup.measures],
              "savings": savings_,
              "saving_bands": hs.bootstrap_savings(rows, ref, setup.s_max, resamples=resamples, measures=setup.measures),
              "plotted_settings": plotted_settings(rows, savings_), "notes": []}
    fewest = min((r for r in rows if r["kind"] == "fixed"), key=lambda r: r["S"])
    if fewest["matches"] and fewest["S"] < setup.s_max:
        result["notes"].append(f"{setup.kind}: {fewest['label']} already matches {ref['label']} (quality flat in S "
                               "within the noise): a rule's saving here says nothing about halting")
    return result


def timed_setting(result: dict, measure: hs.Measure = ACC) -> tuple[str, float] | None:
    """halting_bench.timed_setting on one measure's rows (`measure`: the tie-break without a
    matching rule; the result's first score by default)."""
    return _timed_setting(result["rows"], result["savings"], measure)
