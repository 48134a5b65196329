"""`loopmdm experiment SUITE`: sweep -> final arms -> evaluation -> summary, resumable.

Layout under `results/<suite>-<scale>/` (or --out):
  runs/sweep-<arm>-lr<lr>/      training runs of the learning-rate sweep (smaller budget, seed 0)
  runs/sweep-<arm>-lr<lr>-s<k>/ the same at sweep seed k > 0 (Scale.sweep_seeds, --sweep-seeds)
  runs/<arm>-s<seed>/           final runs at each arm's best learning rate (or, with --lrs-from,
                                the lr an earlier report of the same suite and scale recorded)
  <run>/train_summary.json      written when a run has reached its budget (then it is skipped)
  <run>/eval.json               its evaluation (then it is skipped)
  summary.json, summary.md, *.png

Every training run is a `loopmdm train` subprocess (`--jobs` of them at once, one torch
thread each), resumed from its newest checkpoint if the suite was interrupted.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from loopmdm.errors import LoopMDMError, require
from loopmdm.experiments.suites import KNOB_ARMS, Scale, Suite, arm_overrides, get_suite, sweep_nll
from loopmdm import checkpoint as ckpt
from loopmdm.runfiles import write_text_atomic


@dataclass
class RunSpec:
    name: str
    arm: str
    lr: float
    seed: int
    budget: float
    out_dir: Path
    overrides: list = field(default_factory=list)
    scale_overrides: tuple = ()
    init_overrides: tuple = ()  # fine-tuning suites: the pretrained run and the pairs (attach_init)

    def command(self, suite: Suite) -> list[str]:
        cmd = [sys.executable, "-m", "loopmdm.cli", "train", suite.config, *self.scale_overrides, *self.overrides,
               *self.init_overrides,
               f"train.lr={self.lr}", f"train.seed={self.seed}", f"train.max_flops={self.budget}",
               "train.max_steps=0", "train.max_minutes=0", f"train.out_dir={self.out_dir}", "train.progress=false"]
        if ckpt.has_checkpoint(self.out_dir):
            cmd.append("--resume")
        elif self.out_dir.exists():
            cmd.append("--overwrite")  # a run that died before its first checkpoint
        return cmd


def _lr_name(lr: float) -> str:
    """The lr as a folder name: one significant digit where that is exact (1e-3), else the
    digits it needs (2.5e-4, not 3e-4)."""
    for digits in range(4):
        name = f"{lr:.{digits}e}"
        if float(name) == float(f"{lr:.4g}"):
            return name.replace("e-0", "e-").replace("e+0", "e")
    return f"{lr:.3e}".replace("e-0", "e-")


def _run_dir(runs: Path, prefix: str, lr: float) -> Path:
    """`runs/<prefix><lr>`, or the folder an earlier version named with one digit
    (sweep-mdm-lr3e-4 for lr 2.5e-4) when that run exists and was trained at this lr, so a
    suite resumes it."""
    path = runs / f"{prefix}{_lr_name(lr)}"
    old = runs / f"{prefix}{lr:.0e}".replace("e-0", "e-")
    if not path.exists() and old != path and (old / "config.yaml").is_file():
        import yaml

        trained = (yaml.safe_load((old / "config.yaml").read_text()) or {}).get("train", {}).get("lr")
        if trained is not None and abs(float(trained) - lr) <= 1e-12 + 1e-6 * lr:
            return old
    return path


def _trained(spec: RunSpec) -> bool:
    return (spec.out_dir / "train_summary.json").is_file()


def _check_trained_lr(spec: RunSpec) -> None:
    """A finished run counts as done only if it trained at the lr the plan now asks for (a
    sweep extension can move an arm's best lr after its final runs were trained)."""
    from omegaconf import OmegaConf

    saved = spec.out_dir / "config.yaml"
    if saved.is_file():
        lr = float(OmegaConf.load(saved).train.lr)
        require(abs(lr - spec.lr) <= 1e-12 * max(lr, spec.lr),
                f"run '{spec.out_dir}' trained at lr {lr:g}, but the sweep now picks {spec.lr:g} for arm "
                f"'{spec.arm}'; move that run folder away to retrain it (or use --report-only)")


def train_runs(suite: Suite, specs: list[RunSpec], jobs: int, log) -> None:
    """Train every spec that has no train_summary.json yet, `jobs` at a time."""
    for spec in filter(_trained, specs):
        _check_trained_lr(spec)
    todo = [s for s in specs if not _trained(s)]
    if not todo:
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    def one(spec: RunSpec) -> None:
        spec.out_dir.parent.mkdir(parents=True, exist_ok=True)
        log(f"train {spec.name} (lr {spec.lr:g}, seed {spec.seed}, {spec.budget:.2e} FLOPs)")
        t0 = time.time()
        with open(spec.out_dir.parent / f"{spec.name}.log", "a") as out:
            proc = subprocess.run(spec.command(suite), stdout=subprocess.PIPE, stderr=out, text=True, env=env)
        if proc.returncode != 0:
            raise LoopMDMError(f"training run {spec.name} failed (exit {proc.returncode}); see "
                               f"{spec.out_dir.parent / (spec.name + '.log')}")
        summary = json.loads(proc.stdout[proc.stdout.index("{"):])
        summary["wall_seconds_this_call"] = round(time.time() - t0, 1)
        write_text_atomic(spec.out_dir / "train_summary.json", json.dumps(summary, indent=2) + "\n")
        log(f"done  {spec.name}: val NELBO {summary['val_nll']:.4f} at step {summary['step']}")

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for future in [pool.submit(one, s) for s in todo]:
            future.result()


def swept_arms(suite: Suite) -> list[str]:
    """Arms with a learning-rate sweep of their own. A knob arm (KNOB_ARMS) is a one-change
    ablation of the paper's recipe: it trains at the `loop` arm's best lr, so `loop` is swept
    whenever a knob arm is asked for, even if `loop` itself is not among the arms."""
    arms = [a for a in suite.arms if a not in KNOB_ARMS]
    if "loop" not in arms and any(a in KNOB_ARMS for a in suite.arms):
        arms.append("loop")
    return arms


def arm_seeds(arm: str, scale: Scale) -> tuple:
    """Final seeds of an arm: the knob arms are a screen, one seed (the first) each, unless the
    scale names their seeds (Scale.knob_seeds, --knob-seeds)."""
    if arm in KNOB_ARMS:
        return scale.knob_seeds or scale.seeds[:1]
    return scale.seeds


def _sweep_spec(suite: Suite, scale: Scale, arm: str, lr: float, out: Path, seed: int = 0) -> RunSpec:
    budget = scale.budget_flops * scale.sweep_fraction
    path = _run_dir(out / "runs", f"sweep-{arm}-lr", lr)
    if seed:  # seed 0 keeps the name sweeps had before they had seeds, so those runs are reused
        path = path.with_name(f"sweep-{arm}-lr{_lr_name(lr)}-s{seed}")
    return RunSpec(path.name, arm, lr, seed, budget, path, arm_overrides(suite, arm, budget, scale.overrides),
                   scale.overrides)


def _sweep_specs(suite: Suite, scale: Scale, arm: str, lr: float, out: Path) -> list[RunSpec]:
    return [_sweep_spec(suite, scale, arm, lr, out, seed) for seed in scale.sweep_seeds]


def plan(suite: Suite, scale: Scale, out: Path, best_lr: dict | None) -> tuple[list[RunSpec], list[RunSpec]]:
    """The sweep runs, and (given each swept arm's best lr) the final runs; an arm whose lr
    source is missing from `best_lr` (an unfinished sweep, under --report-only) has none."""
    sweep = [spec for arm in swept_arms(suite) for lr in scale.lrs for spec in _sweep_specs(suite, scale, arm, lr, out)]
    final = []
    lr_of = {arm: "loop" if arm in KNOB_ARMS else arm for arm in suite.arms}
    if best_lr is not None:
        final = [RunSpec(f"{arm}-s{seed}", arm, best_lr[lr_of[arm]], seed,
                         scale.budget_flops, out / "runs" / f"{arm}-s{seed}",
                         arm_overrides(suite, arm, scale.budget_flops, scale.overrides), scale.overrides)
                 for arm in suite.arms if lr_of[arm] in best_lr for seed in arm_seeds(arm, scale)]
    return sweep, final


MAX_EDGE_STEPS = 2  # grid steps an arm's sweep may extend beyond either edge of the grid


def edge_extensions(suite: Suite, scale: Scale, sweep: list[RunSpec], out: Path) -> list[RunSpec]:
    """One more sweep run for every arm whose best lr is at an edge of the lrs it tried: a grid
    step (the ratio of the first two lrs) beyond that edge, so no arm is compared at an optimum
    the grid cut off. Called again after those runs, it extends further while the optimum stays
    at the edge, up to MAX_EDGE_STEPS beyond the grid (the report shows every lr tried)."""
    if len(scale.lrs) < 2:
        return []
    step = scale.lrs[1] / scale.lrs[0]
    low, high = min(scale.lrs) / step ** MAX_EDGE_STEPS, max(scale.lrs) * step ** MAX_EDGE_STEPS
    best = pick_best_lr(sweep)
    extra = []
    for arm, lr in best.items():
        tried = sorted(s.lr for s in sweep if s.arm == arm)
        if lr == tried[-1] and lr * step <= high * 1.01:
            new = lr * step
        elif lr == tried[0] and lr / step >= low / 1.01:  # (1.01: lrs are rounded to 3 digits)
            new = lr / step
        else:
            continue
        extra += _sweep_specs(suite, scale, arm, float(f"{new:.3g}"), out)
    return extra


def attach_init(suite: Suite, specs: list[RunSpec], init_root: Path, pairs_file: Path) -> None:
    """Fine-tuning suites: every run starts from the same arm and seed of `suite.init_of`'s final
    runs (sweeps from seed 0), with that run's tokenizer, on the suite's prompt/answer pairs."""
    for spec in specs:
        source = (init_root / "runs" / f"{spec.arm}-s{spec.seed}").resolve()
        require((source / "train_summary.json").is_file(),
                f"suite '{suite.name}' fine-tunes the runs of suite '{suite.init_of}': '{source}' is missing or "
                f"unfinished; run `loopmdm experiment {suite.init_of}` at this scale first")
        spec.init_overrides = (f"train.init_from={source}", f"data.tokenizer_path={source / 'tokenizer.json'}",
                               "data.source=pairs", f"data.paths=['{pairs_file.resolve()}']")


def attach_retrofit(suite: Suite, specs: list[RunSpec], init_root: Path) -> None:
    """Retrofit suites: every run (either arm) starts from the MDM final run of its seed of
    `suite.retrofit_of` (sweeps from seed 0), on the same data."""
    for spec in specs:
        source = (init_root / "runs" / f"mdm-s{spec.seed}").resolve()
        require((source / "train_summary.json").is_file(),
                f"suite '{suite.name}' trains on the MDM runs of suite '{suite.retrofit_of}': '{source}' is missing "
                f"or unfinished; run `loopmdm experiment {suite.retrofit_of}` at this scale first")
        # its best-validation weights: the MDM the suite reported, not the overfit end of its budget
        spec.init_overrides = (f"train.init_from={source}", "train.init_weights=best")


def adopt_shorter_runs(specs: list[RunSpec], source: Path, log) -> None:
    """--extend-from: a run of this plan not started yet, whose namesake under `source/runs`
    (the same suite at a smaller budget) finished with the same lr and seed, is copied here
    and resumed to this plan's budget, so a larger budget reuses the FLOPs already spent.
    Exact, not an approximation: suite runs are FLOPs-limited (train.max_steps=0), so their
    lr after warm-up is constant and nothing before the old budget depends on the budget; a
    resume replays the same data order and draws (test_extending_a_run_equals_training_it_longer)."""
    import shutil

    from omegaconf import OmegaConf

    for spec in specs:
        if spec.out_dir.exists():
            continue
        # a seed-0 sweep run may have an earlier version's one-digit name there (_run_dir)
        seed0_sweep = spec.name.startswith("sweep-") and spec.seed == 0
        prefix = spec.out_dir.name[: -len(_lr_name(spec.lr))] if seed0_sweep else None
        old = _run_dir(source / "runs", prefix, spec.lr) if prefix else source / "runs" / spec.out_dir.name
        if not (old / "train_summary.json").is_file() or not ckpt.has_checkpoint(old):
            continue
        train = OmegaConf.load(old / "config.yaml").train
        if abs(float(train.lr) - spec.lr) > 1e-12 + 1e-6 * spec.lr or int(train.seed) != spec.seed:
            continue  # the sweep picked another lr at this budget: the final run trains afresh
        require(int(train.max_steps) == 0 and float(train.max_flops) <= spec.budget,
                f"--extend-from: run '{old}' trained to {float(train.max_flops):.3g} FLOPs (max_steps "
                f"{int(train.max_steps)}); only FLOPs-limited runs at most this plan's {spec.budget:.3g} can be extended")
        shutil.copytree(old, spec.out_dir)
        for done in ("train_summary.json", "eval.json"):  # trained on and evaluated again at the new budget
            (spec.out_dir / done).unlink(missing_ok=True)
        log(f"extend {spec.name} from {old} ({float(train.max_flops):.2e} -> {spec.budget:.2e} FLOPs)")


def pick_best_lr(sweep: list[RunSpec]) -> dict:
    """Per arm, the learning rate with the lowest validation NELBO of the sweep (selection_nll),
    averaged over the sweep seeds (Scale.sweep_seeds). Only lrs run at every seed the arm's
    sweep has are compared, so a mean over two seeds never meets one seed's luck."""
    best = {}
    for arm, by_lr in sweep_nll(sweep).items():
        seeds = set(max(by_lr.values(), key=len))  # (--report-only may meet a sweep half done)
        complete = {lr: sum(d.values()) / len(d) for lr, d in by_lr.items() if set(d) == seeds}
        best[arm] = min(complete, key=lambda lr: (complete[lr], lr))
    return best


def evaluate_runs(suite: Suite, specs: list[RunSpec], scale: Scale, jobs: int, log) -> dict:
    """{name: evaluation} of every spec, `jobs` at a time (threads: torch releases the GIL in its
    kernels, and every evaluation draws from generators of its own, so the result does not
    depend on `jobs`; each is cached in its run's eval.json). Threads measured 1.29x on 2 cores,
    subprocesses 1.05x in the same run (benchmarks/README.md), so threads it is."""
    import torch

    from loopmdm.experiments.evaluate import evaluate_run

    threads = torch.get_num_threads()
    if jobs > 1:  # the cores shared out, as the training subprocesses get one thread each
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))
    try:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            results = list(pool.map(lambda spec: evaluate_run(suite, spec, scale, log), specs))
    finally:
        torch.set_num_threads(threads)
    return {spec.name: ev for spec, ev in zip(specs, results)}


def _same_sweep(suite: Suite, recorded_scale: str | None, scale_name: str) -> bool:
    """Whether a report at `recorded_scale` chose its lrs on the sweep `scale_name` would run: the
    same scale, or a longer one that keeps its sweep (shakespeare-bpe cpu-16k-long: 3.6e13 / 6 =
    cpu-16k's 1.2e13 x 0.5, the same lrs and overrides)."""
    if recorded_scale == scale_name:
        return True
    if recorded_scale not in suite.scales or scale_name not in suite.scales:
        return False
    a, b = suite.scales[recorded_scale], suite.scales[scale_name]
    return (math.isclose(a.budget_flops * a.sweep_fraction, b.budget_flops * b.sweep_fraction, rel_tol=1e-9)
            and tuple(a.lrs) == tuple(b.lrs) and a.overrides == b.overrides)


def recorded_sweep(source: Path, suite: Suite, scale_name: str) -> tuple[dict, dict]:
    """--lrs-from: each swept arm's learning rate, and the sweep table that chose it, from an
    earlier report of the same suite and sweep (its summary.json; _same_sweep). Run folders are not committed
    (results/*/runs/), so a fresh checkout adds seeds or arms to a committed suite with this
    instead of re-running the sweep. Returns ({arm: lr}, {arm: {lr: {seed: NELBO}}})."""
    path = source / ("summary.json" if not suite.runs_of else f"summary-{suite.name}.json") if source.is_dir() else source
    require(path.is_file(), f"--lrs-from '{source}' holds no {path.name} of a suite report")
    try:
        summary = json.loads(path.read_text())
    except ValueError as exc:
        raise LoopMDMError(f"--lrs-from '{path}' is not a readable report ({exc})") from None
    was = (summary.get("suite"), summary.get("scale"))
    require(was[0] == suite.name and _same_sweep(suite, was[1], scale_name) and not summary.get("dry_run"),
            f"--lrs-from '{path}' reports suite '{was[0]}' at scale '{was[1]}'{' (a dry run)' if summary.get('dry_run') else ''}; "
            f"this is suite '{suite.name}' at scale '{scale_name}': an lr is chosen per suite and sweep (the same "
            "scale, or one whose sweep has the same budget, lrs and overrides)")
    recorded = summary.get("arms", {})
    best = {}
    for arm in swept_arms(suite):
        require(arm in recorded, f"--lrs-from '{path}' has no lr for arm '{arm}' (it has: {', '.join(recorded) or 'none'}); "
                                 "drop --lrs-from to sweep it")
        best[arm] = float(recorded[arm]["lr"])
    per_seed = summary.get("sweep_val_nll_per_seed") or {  # reports before sweeps had seeds: seed 0
        arm: {lr: {"0": v} for lr, v in by_lr.items()} for arm, by_lr in summary.get("sweep_val_nll", {}).items()}
    table = {arm: {float(lr): {int(k): math.inf if v is None else float(v) for k, v in d.items()}
                   for lr, d in by_lr.items()} for arm, by_lr in per_seed.items()}
    return best, table


def run_suite(name: str, scale_name: str = "cpu", out: str | None = None, jobs: int = 2,
              dry_run: bool = False, arms: list[str] | None = None, loops: list[int] | None = None,
              report_only: bool = False, seeds: list[int] | None = None, extend_from: str | None = None,
              sweep_seeds: list[int] | None = None, lrs_from: str | None = None,
              knob_seeds: list[int] | None = None, log=print) -> dict:
    """Run (or resume) a suite end to end and return its summary. `arms` replaces the suite's
    arm list (e.g. to add the knob arms of experiments/suites.py: loop-lr, loop-late, ...);
    `loops` replaces the inference loop counts evaluated (a run evaluated earlier keeps its
    eval.json, so its table cells stay those it was evaluated at). `report_only` trains and
    evaluates nothing: it reports the runs already on disk (e.g. while a suite is still running).
    `extend_from` is the folder of the same suite at a smaller budget: its finished runs are
    continued to this scale's budget instead of trained from scratch (adopt_shorter_runs).
    `sweep_seeds` replaces the scale's sweep seeds (lrs picked on the mean over them).
    `lrs_from` is an earlier report of the same suite and sweep: its recorded lrs are used and no
    sweep runs (recorded_sweep). `knob_seeds` gives the knob arms these final seeds instead of the
    first seed alone."""
    import dataclasses

    from loopmdm.experiments.report import write_report

    suite = get_suite(name)
    if arms:
        for arm in arms:
            arm_overrides(suite, arm)  # validates the name
        suite = dataclasses.replace(suite, arms=tuple(arms))
    if loops:
        require(all(s >= 1 for s in loops), f"loops {loops} must all be >= 1")
        suite = dataclasses.replace(suite, loops=tuple(sorted(set(loops))))
    require(scale_name in suite.scales, f"scale '{scale_name}' is not allowed; choose one of: {', '.join(suite.scales)}")
    scale = suite.scales[scale_name]
    if seeds:
        require(all(s >= 0 for s in seeds), f"seeds {seeds} must be integers >= 0")
        scale = dataclasses.replace(scale, seeds=tuple(dict.fromkeys(seeds)))
    if sweep_seeds:
        require(all(s >= 0 for s in sweep_seeds), f"sweep seeds {sweep_seeds} must be integers >= 0")
        scale = dataclasses.replace(scale, sweep_seeds=tuple(dict.fromkeys(sweep_seeds)))
    if knob_seeds:
        require(all(s >= 0 for s in knob_seeds), f"knob seeds {knob_seeds} must be integers >= 0")
        require(any(a in KNOB_ARMS for a in suite.arms),
                f"--knob-seeds {','.join(map(str, knob_seeds))} but no knob arm among the arms "
                f"{','.join(suite.arms)}; add one of {', '.join(KNOB_ARMS)} with --arms")
        scale = dataclasses.replace(scale, knob_seeds=tuple(dict.fromkeys(knob_seeds)))
    if dry_run:  # every stage at a token budget: checks the pipeline, measures nothing
        scale = Scale(budget_flops=scale.budget_flops * 1e-3 if scale_name == "cpu" else 2e10,
                      sweep_fraction=0.5, lrs=scale.lrs[:2], seeds=scale.seeds[:1], num_test=16,
                      overrides=scale.overrides, sweep_seeds=scale.sweep_seeds[:1], knob_seeds=scale.knob_seeds[:1])
    recorded = None
    if lrs_from is not None:  # checked before anything is written
        require(not sweep_seeds, "--sweep-seeds and --lrs-from: with --lrs-from no sweep runs; drop one of them")
        from_report = recorded_sweep(Path(lrs_from), suite, scale_name)
    out_dir = Path(out or f"results/{suite.runs_of or name}-{scale_name}" + ("-dryrun" if dry_run else ""))
    # a view suite (runs_of) shares the runs and eval.json of `runs_of`; its report files are its own
    if not report_only:  # a report needs finished runs, which live in out_dir: nothing to create
        out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    attach = lambda specs: None  # noqa: E731
    if suite.init_of:
        from loopmdm.tasks.pairs import make_pairs, write_pairs

        pairs_file = out_dir / "pairs.jsonl"
        if not pairs_file.is_file() and not report_only:
            write_pairs(make_pairs(suite.pairs, suite.pairs_num if not dry_run else 2000, 0), pairs_file)
        init_root = out_dir.parent / (f"{suite.init_of}-{scale_name}" + ("-dryrun" if dry_run else ""))
        attach = lambda specs: attach_init(suite, specs, init_root, pairs_file)  # noqa: E731
    if suite.retrofit_of:
        retro_root = out_dir.parent / (f"{suite.retrofit_of}-{scale_name}" + ("-dryrun" if dry_run else ""))
        attach = lambda specs: attach_retrofit(suite, specs, retro_root)  # noqa: E731
    if extend_from is not None:
        source = Path(extend_from)
        require((source / "runs").is_dir(), f"--extend-from '{extend_from}' holds no runs/ folder of a suite")
        require(source.resolve() != out_dir.resolve(), f"--extend-from '{extend_from}' is the output folder itself")
        if not report_only:
            attach_only = attach
            attach = lambda specs: (attach_only(specs), adopt_shorter_runs(specs, source, log))  # noqa: E731
    train = (lambda specs: None) if report_only else (lambda specs: train_runs(suite, specs, jobs, log))
    if lrs_from is not None:
        best, recorded = from_report
        sweep = []
        log(f"learning rates recorded in {lrs_from} (no sweep)")
    else:
        sweep, _ = plan(suite, scale, out_dir, None)
        attach(sweep)
        if report_only:
            sweep = list(filter(_trained, sweep))
            require(sweep, f"no finished sweep run under {out_dir / 'runs'}: nothing to report")
        train(sweep)
        for _ in range(MAX_EDGE_STEPS):
            extra = edge_extensions(suite, scale, sweep, out_dir)
            attach(extra)
            if report_only:
                extra = list(filter(_trained, extra))
            if not extra:
                break
            log("best lr at the edge of the lrs tried for " + ", ".join(f"{s.arm} (trying {s.lr:g})" for s in extra))
            train(extra)
            sweep += extra
        best = pick_best_lr(sweep)
    log("best learning rates: " + ", ".join(f"{a} {lr:g}" for a, lr in best.items()))
    _, final = plan(suite, scale, out_dir, best)
    attach(final)
    if report_only:
        final = [s for s in final if (s.out_dir / "eval.json").is_file()]
        log(f"report only: {len(final)} evaluated final runs")
    train(final)
    evaluations = evaluate_runs(suite, final, scale, jobs, log)
    summary = write_report(suite, scale_name, scale, out_dir, sweep, final, evaluations,
                           wall_seconds=None if report_only else time.time() - t0, dry_run=dry_run,
                           recorded_sweep=recorded, lrs_from=lrs_from)
    log(f"wrote {out_dir / ('summary.md' if not suite.runs_of else f'summary-{suite.name}.md')}")
    return summary
