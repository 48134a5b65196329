"""The experiment suites of `loopmdm experiment`: which arms, which budgets, what to measure.

Every arm of a suite trains from the suite's base config (a preset: `experiments/<suite>`,
package data in src/loopmdm/configs/) to the same total training FLOPs, with the same seeds (so the same data order
and evaluation draws), at its own best learning rate from a sweep at a smaller budget.
Arms (docs/RESULTS.md):
* ``mdm``       -- the plain MDM: the same layers, no loop.
* ``loop``      -- LoopMDM, the paper's recipe: the base config's early-middle loop block,
                   pure recurrence, S ~ U{1..S_max}, loss at the last loop.
* ``deeper``    -- a non-looped MDM whose per-step FLOPs equal LoopMDM's expected per-step
                   FLOPs (n_layers + (E[S] - 1) * loop layers, rounded).
* ``uniform``   -- the whole stack looped (Universal-Transformer style), S_max chosen so its
                   expected per-step FLOPs are closest to LoopMDM's.
* ``inject``    -- LoopMDM + input injection (ablation, ours).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from loopmdm.config import Config, load_config
from loopmdm.errors import require


@dataclass(frozen=True)
class Scale:
    budget_flops: float  # training FLOPs of every final run
    sweep_fraction: float  # sweep runs train to this fraction of the budget
    lrs: tuple  # learning rates of the sweep
    seeds: tuple  # seeds of the final runs
    num_test: int  # test examples (tasks) / eval batches (lm)
    overrides: tuple = ()  # config overrides of this scale (e.g. a larger batch on a GPU)
    # Seeds of every sweep run: an arm's lr is the one with the lowest *mean* selection NELBO over
    # them, so an lr that trains one seed and stalls another (Sudoku's LoopMDM at 2e-3, one grid
    # step below divergence: seed 0 best, seed 1 stuck) is not picked on seed 0's luck.
    sweep_seeds: tuple = (0,)
    # Final seeds of the knob arms (KNOB_ARMS): empty means the first of `seeds` alone (a knob arm is
    # a screen); --knob-seeds takes a knob a screen singled out to the headline arms' seeds.
    knob_seeds: tuple = ()


@dataclass(frozen=True)
class Suite:
    name: str
    config: str  # preset name of the base config (e.g. experiments/khop; a YAML path also works)
    arms: tuple
    kind: str  # "task" (solve accuracy) or "lm" (NELBO against FLOPs)
    scales: dict = field(default_factory=dict)
    orders: tuple = ()  # decoding orders for task suites
    loops: tuple = (1, 2, 4, 8, 12, 16)  # inference loop counts evaluated
    runs_of: str = ""  # a view of another suite's runs (results/<runs_of>-<scale>): no training of its own
    # Fine-tuning suites: each arm starts from the same arm and seed of `init_of`'s final runs
    # (results/<init_of>-<scale>/runs/<arm>-s<seed>; sweeps from seed 0) and trains on prompt/answer
    # pairs from `pairs` (a `loopmdm pairs` source, `pairs_num` of them, seed 0).
    init_of: str = ""
    pairs: str = ""
    pairs_num: int = 20000
    # Retrofit suites (ours, beyond the paper): every arm starts from the *MDM* final run of the
    # same seed of `retrofit_of` (results/<retrofit_of>-<scale>/runs/mdm-s<seed>; sweeps from seed 0)
    # and trains on for the scale's budget on the same data: `mdm` continues as it was, `loop`
    # loops the base config's layers (the same weights, now shared across S iterations).
    retrofit_of: str = ""


ALL_ARMS = ("mdm", "loop", "deeper", "uniform", "inject")
# GPU task scale: 8x the CPU batch, so each step keeps the GPU busy. 3e14 FLOPs is ~3,300 MDM
# steps of Sudoku 6 x 6 at batch 512: sized (unmeasured: no GPU has run it yet) so the khop and
# sudoku suites, 50 runs at 6 in parallel on one H100, fit benchmarks/gpu_run.sh's 400 s.
GPU_TASK = ("train.batch_size=512", "train.eval_every=500", "train.checkpoint_every=500")
# Knobs the looped-model literature uses (item 6 of the loop issue; all ours, labelled so):
KNOB_ARMS = {
    "loop-lr": "the loop block's lr scaled by 1/E[S] (weight sharing sums S gradient contributions)",
    "loop-late": "S = 1 for the first 35% of the MDM's step count, then the paper's S draw",
    "loop-time": "time-conditioned adaLN (the paper does not say whether t is fed)",
    "loop-trunc": "truncated backprop: gradients through the last 2 iterations only (Huginn)",
    "loop-smax2x": "S_max doubled",
}

# k-hop at GPU scale: 18 nodes, 8 hops. Hops < nodes / 2 (tasks/khop.py): on one cycle hop N - k is
# k look-ups backwards, and hop N / 2 is the one node left once N / 2 - 1 look-ups each way are known
# (elimination), so with 18 nodes hop 8 is 8 look-ups either way, with 3 candidates left after 7:
# ~9 rounds of attention by chasing the chain under one-shot decoding, ~4 by pointer doubling,
# which a 4-layer MDM has only just. Sequences of 18 edges + start + 8 answers; 18 + 324 token ids.
KHOP_GPU = ("data.task_size=18", "data.task_hops=8")
KHOP_SHALLOW = ("data.task_size=8", "data.task_hops=4", "model.n_layers=2", "model.loop_start=0", "model.loop_end=1",
                "model.max_train_loops=4")
# The same 2-layer stack on 10 nodes: hop 4 is past its one-call reach, and elimination leaves 3
# candidates after f^-3..f^3 (cpu-shallow's 8 nodes leave one, tasks/khop.py), so a 2-layer MDM's
# hop 4 is at most ~1/3. (16 nodes left no arm off the plateau at the sweep's 8e12 FLOPs.)
KHOP_SHALLOW10 = ("data.task_size=10", *KHOP_SHALLOW[1:])

SUITES = {
    "khop": Suite("khop", "experiments/khop", ALL_ARMS, "task",
                  {"cpu": Scale(2.4e13, 0.25, (3e-4, 1e-3, 3e-3), (0, 1), 500),
                   # past the MDM's depth (the regime issue): 8 nodes, 4 hops (the most one cycle allows,
                   # tasks/khop.py): hop 4 is 4 look-ups, ~5 rounds of attention by chasing under one-shot
                   # decoding, past a 4-layer MDM's one call (~3 by pointer doubling, within it: tasks/khop.py,
                   # docs/RESULTS.md); 8e12 FLOPs is ~1,600 MDM steps of 64
                   # examples (unlimited data: each example is fresh).
                   "cpu-deep": Scale(8e12, 0.5, (3e-4, 1e-3), (0, 1, 2), 500, ("data.task_size=8", "data.task_hops=4")),
                   # cpu-deep at 4x the budget (~7,700 MDM steps, ~1.2 epochs of the 400k examples): every
                   # cpu-deep curve was still falling. The sweep is at cpu-deep's final budget over every lr
                   # cpu-deep tried; run it with --extend-from results/khop-cpu-deep --arms mdm,loop.
                   "cpu-deep-long": Scale(3.2e13, 0.25, (2.7e-5, 9e-5, 3e-4, 1e-3), (0, 1, 2), 500,
                                          ("data.task_size=8", "data.task_hops=4")),
                   # ~3x cpu-deep-long (~24k MDM steps, ~3.9 epochs): both arms were still falling at
                   # 3.2e13 and the MDM still learning hop 3. Sweep at 8e12, so cpu-deep-long's sweep runs
                   # are reused as they are; run it with --extend-from results/khop-cpu-deep-long --arms mdm,loop.
                   "cpu-deep-longer": Scale(1e14, 0.08, (2.7e-5, 9e-5, 3e-4, 1e-3), (0, 1, 2), 500,
                                            ("data.task_size=8", "data.task_hops=4")),
                   # Depth-bound (ours): a 4-layer MDM learned all 4 hops at cpu-deep-longer, so the stack is
                   # cut to 2 layers. In one call 2 layers reach hop 3 at most: in layer 1 an edge token a>b
                   # can read only its neighbours (z>a, b>c) and the start node, so the edge whose
                   # predecessor is s holds f^3(s) for the slot to read in layer 2, and the edge whose
                   # successor is s holds f^-3(s). On 8 nodes that leaves hop 4 as the one node not yet
                   # seen, so a 2-layer MDM can answer it by elimination (its seed 2 did, 0.46: docs/RESULTS.md);
                   # cpu-shallow10 (10 nodes) closes that. LoopMDM loops layer 0 (no prelude; coda =
                   # layer 1), S ~ U{1..4}: 3.5 layer passes a step, 1.75x the MDM's (the paper's 1.9x);
                   # the deeper arm has 4 layers.
                   "cpu-shallow": Scale(3.2e13, 0.25, (9e-5, 3e-4, 1e-3), (0, 1, 2), 500, KHOP_SHALLOW),
                   "cpu-shallow10": Scale(3.2e13, 0.25, (9e-5, 3e-4, 1e-3), (0, 1, 2), 500, KHOP_SHALLOW10),
                   "gpu": Scale(3e14, 0.25, (1e-3, 3e-3, 1e-2), (0, 1), 2000, GPU_TASK + KHOP_GPU)},
                  orders=("oneshot",)),
    "sudoku": Suite("sudoku", "experiments/sudoku", ALL_ARMS, "task",
                    {"cpu": Scale(2.4e13, 0.2, (1e-3, 3e-3, 1e-2), (0, 1), 300),
                     "gpu": Scale(3e14, 0.25, (1e-3, 3e-3, 1e-2), (0, 1), 1000, GPU_TASK)},
                    orders=("raster", "confidence", "oneshot")),
    # cpu: 7.2e12 FLOPs is ~500 MDM steps of batch 16 x 128 tokens (DiT 4 x 128, one thread each),
    # ~8 min a run, so sweep + 10 final runs fit ~90 min at --jobs 2;
    # gpu: 8x wider batches and a 256-wide model (unmeasured: no GPU has run it yet).
    "lm": Suite("lm", "experiments/lm", ALL_ARMS, "lm",
                {"cpu": Scale(7.2e12, 0.5, (3e-4, 1e-3, 3e-3), (0, 1), 8),
                 "gpu": Scale(2e15, 0.25, (3e-4, 1e-3, 3e-3), (0, 1), 32,
                              ("train.batch_size=128", "model.d_model=256", "train.eval_every=500"))},
                loops=(1, 2, 4, 6, 8, 12, 16, 24)),
}
# The paper's regime at CPU scale (docs/RESULTS.md, "Which regime"): 32k characters of plays seen for
# tens of epochs, every arm selected at its best validation NELBO and reported on held-out test plays.
# cpu: 1.2e13 FLOPs is ~1,050 MDM steps of 16 x 128 characters (~66 epochs; LoopMDM ~550 steps, ~34
# epochs), ~8 min a run on one core; sweep at half the budget (seed 0), finals on 3 seeds. (A 64k-
# character calibration run of the MDM was still improving at 37 epochs: diffusion repeats data well.)
SUITES["shakespeare-char"] = Suite("shakespeare-char", "experiments/shakespeare-char", ("mdm", "loop", "deeper"),
                                   "lm", {"cpu": Scale(1.2e13, 0.5, (1e-3, 2e-3, 4e-3), (0, 1, 2), 16),
                                    # 8x less unique text (4k characters, 2 steps an epoch): hundreds of epochs
                                    "cpu-4k": Scale(1.2e13, 0.5, (5e-4, 1e-3, 2e-3), (0, 1, 2), 16, ("data.train_tokens=4096",)),
                                    # 3x the 4k budget, so LoopMDM (still improving at ~280 epochs in cpu-4k)
                                    # reaches its own best too: ~1,700 LoopMDM steps, ~830 epochs. Run it with
                                    # --extend-from results/shakespeare-char-cpu-4k to train cpu-4k's runs on.
                                    "cpu-4k-long": Scale(3.6e13, 0.5, (5e-4, 1e-3, 2e-3), (0, 1, 2), 16,
                                                         ("data.train_tokens=4096",))},
                                   loops=(1, 2, 4, 8, 12, 16))
# The same regime at a BPE vocabulary (the regime issue, item 1: is the character-level reading an
# artifact of 86 symbols?): a byte-level BPE of 512 pieces trained on the train plays (~1.9
# characters a piece), the same model, splits and recipe.
# cpu-4k (a calibration): 2,048 pieces (one batch an epoch, ~3.9k characters: the unique text of
# shakespeare-char's cpu-4k) is too little for 512 pieces -- every sweep run peaked at epoch 96-160
# at 5.34-5.42 nats/piece, above the unigram's 5.20, then memorised (docs/RESULTS.md).
# cpu-16k: 8x that (16,384 pieces, ~31k characters, about shakespeare-char cpu's 32k); 1.2e13 FLOPs
# is ~1,060 MDM steps = ~133 epochs, ~570 LoopMDM steps = ~71 epochs.
BPE = ("name=shakespeare-bpe", "data.tokenizer=bpe", "data.bpe_vocab_size=512")
SUITES["shakespeare-bpe"] = Suite("shakespeare-bpe", "experiments/shakespeare-char", ("mdm", "loop", "deeper"), "lm",
                                  {"cpu-4k": Scale(1.2e13, 0.5, (5e-4, 1e-3, 2e-3), (0, 1, 2), 16,
                                                   (*BPE, "data.train_tokens=2048")),
                                   "cpu-16k": Scale(1.2e13, 0.5, (5e-4, 1e-3, 2e-3), (0, 1, 2), 16,
                                                    (*BPE, "data.train_tokens=16384")),
                                   # 3x cpu-16k: there the MDM had flattened (past its best in 1 of 3
                                   # seeds, ~124 epochs) while LoopMDM was still leaving the unigram
                                   # plateau (~68 epochs). The sweep stays at cpu-16k's 6e12 (1/6 of
                                   # this budget), so its runs are reused; run it with
                                   # --extend-from results/shakespeare-bpe-cpu-16k --arms mdm,loop.
                                   "cpu-16k-long": Scale(3.6e13, 1 / 6, (5e-4, 1e-3, 2e-3), (0, 1, 2), 16,
                                                         (*BPE, "data.train_tokens=16384"))},
                                  loops=(1, 2, 4, 8, 12, 16))
# Data-limited Sudoku (the regime issue): 1,000 solved 6 x 6 boards seen for tens of epochs (the
# looped-Sudoku literature trains tens to hundreds of epochs on a few thousand puzzles,
# ../shared/LOOPS.md); every arm selected at its best validation NELBO (300 held-out boards) and
# solved on 300 test puzzles made from a test split of its own seed (never used for a choice).
# cpu: 1e13 FLOPs is ~870 MDM steps of 64 boards (~56 epochs; LoopMDM ~470 steps, ~30 epochs).
SUITES["sudoku-scarce"] = Suite("sudoku-scarce", "experiments/sudoku", ("mdm", "loop", "deeper"), "task",
                                {"cpu": Scale(1e13, 0.5, (5e-4, 1e-3, 2e-3), (0, 1, 2), 300,
                                              ("data.task_examples=1000", "data.val_fraction=0.3",
                                               "data.test_fraction=0.5", "train.eval_every=32",
                                               "train.checkpoint_every=96", "train.warmup_steps=50")),
                                 # 3x the budget (~170 MDM epochs, ~90 LoopMDM epochs), so LoopMDM, still
                                 # falling at 1e13, reaches its plateau too; run it with --extend-from
                                 # results/sudoku-scarce-cpu --arms mdm,loop to train those runs on.
                                 "cpu-long": Scale(3e13, 0.5, (5e-4, 1e-3, 2e-3), (0, 1, 2), 300,
                                                   ("data.task_examples=1000", "data.val_fraction=0.3",
                                                    "data.test_fraction=0.5", "train.eval_every=32",
                                                    "train.checkpoint_every=96", "train.warmup_steps=50")),
                                 # both arms still improving at 3e13 (MDM ~167 epochs, LoopMDM ~89): twice
                                 # that, with --extend-from results/sudoku-scarce-cpu-long --arms mdm,loop.
                                 "cpu-longer": Scale(6e13, 0.5, (5e-4, 1e-3, 2e-3), (0, 1, 2), 300,
                                                     ("data.task_examples=1000", "data.val_fraction=0.3",
                                                      "data.test_fraction=0.5", "train.eval_every=32",
                                                      "train.checkpoint_every=96", "train.warmup_steps=50"))},
                                orders=("raster", "confidence", "oneshot"))
# Retrofit (ours, beyond the paper; the regime issue, item 5): the 4k-character suite's MDMs, from
# their best-validation weights (~epoch 230, after which they overfit), trained on for 6e12 more FLOPs
# either as they are (`mdm`) or with layer 1 looped (`loop`, S ~ U{1..8}); the same data, seeds,
# selection on validation and test split.
SUITES["retrofit-char"] = Suite("retrofit-char", "experiments/shakespeare-char", ("mdm", "loop"), "lm",
                                {"cpu-4k": Scale(6e12, 0.5, (2.5e-4, 1e-3, 4e-3), (0, 1, 2), 16,
                                                 ("data.train_tokens=4096", "train.warmup_steps=20"))},
                                loops=(1, 2, 4, 8, 12, 16), retrofit_of="shakespeare-char")
# Reasoning after fine-tuning (the reasoning issue): the `lm` suite's pretrained MDM, LoopMDM and deeper
# MDM, fine-tuned on multi-step arithmetic (reasoning-gym chain_sum, 1-digit operands, 2-4 terms: the
# difficulty) with the same recipe and FLOPs; exact match per S and per number of terms.
# cpu: 6e12 FLOPs is ~360 MDM steps of batch 64 x 40 tokens (~6 min a run on a free core).
SUITES["arith"] = Suite("arith", SUITES["lm"].config, ("mdm", "loop", "deeper"), "task",
                        {"cpu": Scale(6e12, 0.5, (1e-4, 3e-4, 1e-3), (0, 1), 400,
                                      ("data.seq_len=40", "train.batch_size=64", "train.warmup_steps=0",
                                       "train.eval_every=100", "train.checkpoint_every=100", "train.ema=0.99")),
                         "gpu": Scale(1e14, 0.25, (1e-4, 3e-4, 1e-3), (0, 1), 1000,
                                      ("data.seq_len=40", "train.batch_size=256", "train.warmup_steps=0",
                                       "train.eval_every=200", "train.checkpoint_every=200", "train.ema=0.99",
                                       "model.d_model=256"))},
                        orders=("confidence", "raster"), loops=(1, 2, 4, 8, 16), init_of="lm",
                        pairs="rg:chain_sum:min_terms=2,max_terms=4,min_digits=1,max_digits=1")
# Inference-time loops on the `lm` suite's runs: NELBO at S in {1, 2, 4, 6, 8, 12, 16, 24} beside
# MDM, split by the noise level t (the report's by-t tables); trains nothing `lm` has not.
SUITES["inference-loops"] = Suite("inference-loops", SUITES["lm"].config, ALL_ARMS, "lm", SUITES["lm"].scales,
                                  loops=(1, 2, 4, 6, 8, 12, 16, 24), runs_of="lm")


def selection_nll(summary: dict) -> float:
    """What a sweep compares: the run's best validation NELBO (early-stopping selection) where
    it kept one, else its final one (runs trained before best-checkpoint selection existed)."""
    best = summary.get("best_val_nll")
    return float(best) if best is not None else float(summary["val_nll"])


def sweep_nll(sweep: list) -> dict:
    """{arm: {lr: {seed: selection NELBO}}} of the finished runs among `sweep` (runner.RunSpec); a diverged run (NaN)
    counts as +inf, so it can only lose."""
    table: dict = {}
    for spec in sweep:
        if not (spec.out_dir / "train_summary.json").is_file():  # not finished
            continue
        nll = selection_nll(json.loads((spec.out_dir / "train_summary.json").read_text()))
        table.setdefault(spec.arm, {}).setdefault(spec.lr, {})[spec.seed] = math.inf if math.isnan(nll) else nll
    return table


def suite_scoring(suite: Suite):
    """How a task suite's answers are scored: its pairs (a fine-tuning suite) or its base config's task."""
    from loopmdm.evaluation.solve import scoring_of

    return scoring_of("pairs" if suite.pairs else load_config(suite.config).data.task)


def get_suite(name: str) -> Suite:
    require(name in SUITES, f"suite '{name}' is not allowed; choose one of: {', '.join(SUITES)}")
    return SUITES[name]


def layer_passes(cfg: Config, expected: bool = True) -> float:
    """Layer passes per forward at E[S] (the paper's F_base + (E[S]-1) * n_loop * F_layer)."""
    m = cfg.model
    if not m.is_looped:
        return float(m.n_layers)
    mean_s = (m.max_train_loops + 1) / 2
    return m.n_layers + (mean_s - 1) * m.n_loop_layers


def arm_overrides(suite: Suite, arm: str, budget: float | None = None, scale_overrides: tuple = ()) -> list[str]:
    """Config overrides that turn the suite's base config, with a scale's overrides applied
    (`scale_overrides`: a scale may change the model, e.g. khop cpu-shallow), into `arm`
    (trained to `budget` FLOPs); they go after the scale's on the command line."""
    allowed = tuple(dict.fromkeys((*suite.arms, "loop", *KNOB_ARMS)))  # `loop` is the base of every knob arm
    require(arm in allowed, f"arm '{arm}' is not allowed in suite '{suite.name}'; choose from: {', '.join(allowed)}")
    base = load_config(suite.config, list(scale_overrides))
    m = base.model
    require(m.is_looped, f"the base config of suite '{suite.name}' must define the loop (model.loop_start/loop_end)")
    target = layer_passes(base)
    if arm == "loop":
        return []
    mean_s = (m.max_train_loops + 1) / 2
    if arm == "loop-lr":
        return [f"train.loop_lr_scale={1 / mean_s:.4g}"]
    if arm == "loop-late":
        from loopmdm.model.flops import train_flops

        mdm = load_config(suite.config, [*scale_overrides, "model.loop_start=null", "model.loop_end=null"])
        step_flops = base.train.batch_size * train_flops(mdm.model, base.data.seq_len, 1)
        budget = budget or base.train.max_flops or 0.0
        steps = int(0.35 * budget / step_flops) if budget else 0
        return [f"train.loops_from_step={steps}"]
    if arm == "loop-time":
        return ["model.time_conditioning=true"]
    if arm == "loop-trunc":
        return ["model.grad_loops=2"]
    if arm == "loop-smax2x":
        return [f"model.max_train_loops={2 * m.max_train_loops}"]
    if arm == "inject":
        return ["model.input_injection=true"]
    if arm == "mdm":
        return ["model.loop_start=null", "model.loop_end=null"]
    if arm == "deeper":
        return ["model.loop_start=null", "model.loop_end=null", f"model.n_layers={int(round(target))}"]
    # uniform: loop all layers; pick S_max whose expected passes n * (S_max + 1) / 2 is closest
    best = min(range(1, 4 * m.max_train_loops + 1), key=lambda s: abs(m.n_layers * (s + 1) / 2 - target))
    return ["model.loop_start=0", f"model.loop_end={m.n_layers}", f"model.max_train_loops={best}"]
