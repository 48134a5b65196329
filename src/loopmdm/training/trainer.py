"""The training loop, written out step by step.

Per step (paper Sec. 3): draw S ~ U{1..max_train_loops} from (seed, step); for each micro-batch
draw t and x_t ~ q(x_t|x_0), run the looped denoiser with S loops, take MDLM's NELBO on the
final loop's output, backprop; clip, AdamW, EMA. Every step is charged its analytic FLOPs for
the S it actually drew. Data parallelism is applied from outside through `DistContext`
(training/distributed.py): the trainer only asks it to wrap the model (DDP or FSDP2), skip
gradient sync on non-final micro-batches, average logged scalars, and gather / scatter the
full (world-size independent) states that checkpoints hold.
"""

from __future__ import annotations

import copy
import json
import math
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from loopmdm.analysis.loop_diagnostics import compact_record, loop_diagnostics
from loopmdm.config import Config
from loopmdm.data.loader import BlockLoader, eval_rows
from loopmdm.data.prepared import PreparedData
from loopmdm.devices import autocast_context, resolve_device
from loopmdm.diffusion.objective import diffusion_loss, maskable_after
from loopmdm.diffusion.schedule import make_schedule
from loopmdm.errors import LoopMDMError, require
from loopmdm.evaluation.judge import ar_loss
from loopmdm.evaluation.nelbo import evaluate_nelbo
from loopmdm.model.denoiser import LoopedDenoiser
from loopmdm.model.flops import train_flops
from loopmdm.runfiles import append_line, disk_error, finite_or_none, note, read_jsonl, write_if_changed
from loopmdm import checkpoint as ckpt
from loopmdm.training.distributed import DistContext, full_tensor, local_tensor
from loopmdm.training.ema import EMA
from loopmdm.training.loops import train_num_loops
from loopmdm.training.speed import apply_speedups
from loopmdm.training.lr import learning_rate


PARTS = ("prelude", "loop_block", "coda")


def _part_of(name: str) -> str:
    return next((part for part in PARTS if name.startswith(part + ".")), "other")  # other: embeddings, head


@torch.no_grad()
def part_norms(model: torch.nn.Module, before: dict) -> dict:
    """{grad_norm_<part>, update_ratio_<part>}: the (clipped) gradient norm of each part and its
    step's relative change ||theta' - theta|| / ||theta|| (AdamW's effective step size)."""
    sums: dict = {}
    for name, p in model.named_parameters():
        part = _part_of(name)
        g, d, w = sums.setdefault(part, [0.0, 0.0, 0.0]), p.detach() - before[name], before[name]
        if p.grad is not None:
            g[0] += float(p.grad.detach().float().pow(2).sum())
        g[1] += float(d.float().pow(2).sum())
        g[2] += float(w.float().pow(2).sum())
    out = {}
    for part, (g2, d2, w2) in sums.items():
        out[f"grad_norm_{part}"] = round(math.sqrt(g2), 6)
        out[f"update_ratio_{part}"] = round(math.sqrt(d2) / max(math.sqrt(w2), 1e-12), 8)
    return out


class StopOnSignal:
    """SIGINT / SIGTERM (Ctrl-C, a scheduler's preemption) ask the loop to stop *between*
    steps, so the checkpoint it then writes is consistent (never half an optimizer step).
    A second Ctrl-C stops at once, without saving."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.name = ""
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.name = True, signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers only work there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class Trainer:
    def __init__(self, cfg: Config, data: PreparedData, run_dir: str | Path, dist: DistContext | None = None):
        self.cfg, self.data, self.run_dir = cfg, data, Path(run_dir)
        self.dist = dist or DistContext()
        tc = cfg.train
        self.device = getattr(self.dist, "device", None) or resolve_device(tc.device)
        torch.manual_seed(tc.seed)  # same initial weights on every rank
        self.model = LoopedDenoiser(cfg.model).to(self.device)
        self.speedups = apply_speedups(self.model, tc, self.device)  # TF32, per-block compile
        self.train_model = self.dist.wrap(self.model)
        self.schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.eps)
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                                           fused=self.device.type == "cuda")
        self.ema = EMA(self.model, tc.ema) if tc.ema > 0 else None
        world = self.dist.world_size
        micro = tc.micro_batch_size or tc.batch_size // world
        require(micro >= 1, f"train.batch_size={tc.batch_size} is smaller than the world size {world}")
        require(tc.batch_size % (micro * world) == 0,
                f"train.batch_size={tc.batch_size} must be a multiple of micro_batch_size x world_size = {micro} x {world}")
        self.micro_batch, self.accum_steps = micro, tc.batch_size // (micro * world)
        self.seq_len = data.seq_len
        train_blocks = data.blocks("train")
        if cfg.data.train_tokens:  # the data-scarce regime: a fixed prefix of the split, repeated
            n_blocks = math.ceil(cfg.data.train_tokens / data.seq_len)
            require(n_blocks <= len(train_blocks),
                    f"data.train_tokens={cfg.data.train_tokens} asks for {n_blocks} blocks of {data.seq_len} tokens; "
                    f"the train split has {len(train_blocks)} ({len(train_blocks) * data.seq_len} tokens)")
            train_blocks = train_blocks[:n_blocks]
        # Unique training tokens (pads included: they are rows of the split): one epoch.
        self.epoch_tokens = len(train_blocks) * data.seq_len
        self.loader = BlockLoader(train_blocks, micro, tc.seed, self.dist.rank, world)
        self.augment = None
        if cfg.data.source == "task" and cfg.data.task_augment:
            from loopmdm.tasks import get_task

            self.augment = get_task(cfg.data.task).augment
        self.best_val: float | None = None  # lowest validation NELBO so far (its weights: ckpt.BEST_FILE)
        self.generator = torch.Generator(device=self.device)  # reseeded every step (train_step)
        self.use_pad_mask = data.meta.get("packing") == "pad"
        self.val_unigram: float | None = None
        # Counters that a checkpoint carries so that a resumed run continues exactly.
        self.step, self.tokens, self.flops, self.train_time = 0, 0, 0.0, 0.0
        self.interval = {"loops": 0, "steps": 0}
        self.loss_accum = torch.zeros((), device=self.device)
        self.saved_step: int | None = None  # the step of the checkpoint on disk (None: none yet)
        self.resumed_step: int | None = None

    def _param_groups(self):
        """Weight decay on matrices only; with train.loop_lr_scale != 1 the loop block's
        parameters get their own groups, whose lr is scaled (`lr_scale`, applied every step)."""
        tc = self.cfg.train
        loop_ids = {id(p) for p in self.model.loop_block.parameters()} if tc.loop_lr_scale != 1.0 else set()
        groups = []
        for scale, members in ((1.0, lambda p: id(p) not in loop_ids), (tc.loop_lr_scale, lambda p: id(p) in loop_ids)):
            params = [p for p in self.model.parameters() if members(p)]
            if params:
                groups.append({"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay, "lr_scale": scale})
                groups.append({"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_scale": scale})
        return groups

    # --------------------------------------------------------------------- state
    def init_from_run(self, run_dir: str) -> None:
        """Start from a trained run's weights (EMA, as it would be sampled): fine-tuning. The
        run's tokenizer must be the data's, and its model must have this run's shapes; the
        loop range and S_max may differ (they hold no weights)."""
        from loopmdm.runs import load_run

        source = load_run(run_dir, device="cpu", best=self.cfg.train.init_weights == "best")
        require(source.tokenizer.fingerprint() == self.data.tokenizer.fingerprint(),
                f"train.init_from='{run_dir}' was trained with another tokenizer than this data; prepare the "
                f"data with data.tokenizer_path={Path(run_dir) / 'tokenizer.json'}")
        from loopmdm.model.denoiser import restack_layers

        mine = self.model.state_dict()
        # The loop range may differ (an MDM retrofitted into a LoopMDM): the same layers, renamed.
        theirs = restack_layers(source.model.state_dict(), source.model.cfg, self.cfg.model) \
            if source.model.cfg.n_layers == self.cfg.model.n_layers else source.model.state_dict()
        mismatch = [k for k in mine if k not in theirs or theirs[k].shape != mine[k].shape]
        require(not mismatch and len(mine) == len(theirs),
                f"train.init_from='{run_dir}' has another model shape (first difference: "
                f"{(mismatch or sorted(set(theirs) - set(mine)))[:1]}); use its model.* settings")
        self.dist.load_model_state(self.model, theirs)
        if self.ema:
            self.ema = EMA(self.model, self.cfg.train.ema)

    def train_state(self) -> dict:
        """Counters, optimizer and loader state (under FSDP a collective: every rank calls it,
        the main rank's result is the full optimizer state)."""
        state = {
            "step": self.step, "tokens": self.tokens, "flops": self.flops, "train_time": self.train_time,
            "interval": dict(self.interval), "loss_accum": self.loss_accum.cpu(),
            "optimizer": self.dist.optimizer_state(self.model, self.optimizer),
            "loader": self.loader.state_dict(),
            "config": self.cfg.to_dict(),  # lets a run whose config.yaml was lost be reopened
        }
        return state

    def check_finite(self, loss_value: float = 0.0) -> None:
        """Stop (exit 2) rather than log, save or validate a non-finite loss or weights: the
        checkpoint on disk stays the last finite one."""
        finite = math.isfinite(loss_value) and bool(torch.isfinite(self.loss_accum).all()) and bool(torch.stack(
            [torch.isfinite(local_tensor(p)).all() for p in self.model.parameters()]).all())
        if self.dist.any(not finite):  # under FSDP each rank sees only its shard
            raise self.diverged("the loss or the weights became non-finite (NaN/inf)")

    def diverged(self, what: str) -> LoopMDMError:
        if self.saved_step is not None:
            kept, then = f"the last finite checkpoint step-{self.saved_step:07d} is kept", "and --resume"
        else:
            kept, then = "no checkpoint was saved", "and start again with --overwrite"
        return LoopMDMError(f"training diverged: {what} by step {self.step} (train.lr={self.cfg.train.lr:g}); "
                            f"stopped without saving, {kept}; lower train.lr (or raise train.warmup_steps) {then}")

    def save(self) -> None:
        if self.step == self.saved_step:  # nothing new (e.g. --resume of a finished run)
            return
        self.check_finite()
        # Full states, gathered from the shards under FSDP (collectives: every rank takes part).
        model_state = self.dist.model_state(self.model)
        ema_state = self.ema.full_state_dict() if self.ema else None
        train_state = self.train_state()
        if self.dist.is_main:
            ckpt.save_checkpoint(self.run_dir, self.step, model_state, ema_state, train_state)
        self.saved_step = self.step
        self.dist.barrier()

    def _load_checkpoint(self, path: Path) -> None:
        """Load every part of checkpoint `path` (a LoopMDMError if any part is damaged)."""
        weights = ckpt.load_weights(path, use_ema=False)
        state = ckpt.load_train_state(path)
        ema = ckpt.load_weights(path, use_ema=True, require_ema=True) if self.ema else None
        try:
            self.dist.load_model_state(self.model, weights)
            if self.ema:
                self.ema.load_state_dict(ema, num_updates=state["step"])
            self.dist.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
            self.loader.load_state_dict(state["loader"])
            self.step, self.tokens, self.flops = int(state["step"]), state["tokens"], state["flops"]
            self.train_time, self.interval = state["train_time"], dict(state["interval"])
            self.loss_accum = state["loss_accum"].to(self.device)
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LoopMDMError(f"checkpoint '{path}' does not fit this run "
                               f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ''})") from None

    def resume(self) -> None:
        """Continue from the checkpoint `latest` names, or from the newest intact one."""
        from loopmdm.runs import open_checkpoint

        path, _ = open_checkpoint(self.run_dir, self._load_checkpoint,
                                  say=note if self.dist.is_main else (lambda _msg: None))
        self.saved_step = self.resumed_step = self.step
        self._truncate_metrics(self.step)
        # The best weights on disk count if they are from this timeline; written after the
        # checkpoint we resume from, they are re-earned (the replay is exact) or replaced.
        info = ckpt.read_best_info(self.run_dir)
        if info is not None and info.get("step", self.step + 1) <= self.step:
            self.best_val = float(info["val_nll"])
        else:
            vals = [r["val_nll"] for r in read_jsonl(self.metrics_path)
                    if r.get("kind") == "val" and isinstance(r.get("val_nll"), (int, float))]
            self.best_val = min(vals) if vals and info is not None else None

    # --------------------------------------------------------------------- metrics
    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def _log(self, record: dict) -> None:
        if self.dist.is_main:
            try:
                append_line(self.metrics_path, json.dumps(finite_or_none(record), allow_nan=False))
            except OSError as exc:
                kept = f"checkpoint step-{self.saved_step:07d} is kept" if self.saved_step is not None else "no checkpoint yet"
                raise disk_error(exc, f"'{self.metrics_path}'", kept, "continue with --resume") from None

    def _truncate_metrics(self, step: int) -> None:
        """Drop records written after the checkpoint we resume from (and a partial last line),
        so the file continues exactly as an uninterrupted run would have written it."""
        if not self.dist.is_main or not self.metrics_path.exists():
            return
        kept = [r for r in read_jsonl(self.metrics_path) if isinstance(r.get("step"), int) and r["step"] <= step]
        try:
            write_if_changed(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        except OSError as exc:
            raise disk_error(exc, f"'{self.metrics_path}'") from None

    def last_val_record(self) -> dict | None:
        records = [r for r in read_jsonl(self.metrics_path) if r.get("kind") == "val" and r.get("step") == self.step]
        return records[-1] if records else None

    # --------------------------------------------------------------------- loop
    @property
    def epoch(self) -> float:
        """Passes over the (capped) train split so far."""
        return self.tokens / max(self.epoch_tokens, 1)

    def _done(self) -> bool:
        tc = self.cfg.train
        return ((tc.max_steps > 0 and self.step >= tc.max_steps)
                or (tc.max_flops > 0 and self.flops >= tc.max_flops)
                or (tc.max_minutes > 0 and self.train_time >= 60.0 * tc.max_minutes))

    def train_step(self) -> tuple[torch.Tensor, int, torch.Tensor]:
        """One optimizer step. Returns (mean loss, S, grad norm) as tensors (no host sync)."""
        cfg, tc = self.cfg, self.cfg.train
        num_loops = (train_num_loops(self.step, tc.seed, cfg.model.max_train_loops, tc.loops_from_step)
                     if self.model.is_looped else 1)
        lr = learning_rate(self.step, tc, tc.max_steps or None)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        world, rank = self.dist.world_size, self.dist.rank
        for micro in range(self.accum_steps):
            # Every random draw (t, masks, dropout) comes from a seed fixed by (seed, step, which
            # slice of the global batch this micro-batch is: the loader hands rank r of W slice
            # micro * W + r). So ranks differ, the same global and micro batch draw the same noise
            # on 1 rank x 4 micro-steps as on 2 x 2 or 4 x 1, and a resumed run repeats the step
            # exactly, with no RNG state to carry in the checkpoint.
            slice_seed = ((tc.seed * 1_000_003 + micro * world + rank) * 1_000_003 + self.step) % (2**63)
            self.generator.manual_seed(slice_seed)
            torch.manual_seed(slice_seed)
            x0 = self.loader.next_batch()
            if self.augment is not None:  # seeded by the step's slice: a resumed run repeats it
                x0 = torch.from_numpy(self.augment(x0.numpy(), cfg.data.task_size, np.random.default_rng(slice_seed)))
            x0 = x0.to(self.device, non_blocking=True)
            valid = (x0 != self.data.pad_id) if self.use_pad_mask else None
            sync = micro == self.accum_steps - 1
            with (nullcontext() if sync else self.dist.no_sync(self.train_model)):
                with autocast_context(self.device, tc.precision):
                    if cfg.model.causal:  # the autoregressive judge (evaluation/judge.py)
                        out = ar_loss(self.train_model, x0, valid)
                    else:
                        out = diffusion_loss(self.train_model, x0, self.schedule, num_loops=num_loops,
                                             eps=cfg.diffusion.eps, antithetic=cfg.diffusion.antithetic,
                                             generator=self.generator, valid=valid, mask_id=self.model.mask_id,
                                             maskable=maskable_after(self.data.prompt_len, x0, self.data.prompt_sep_id))
                (out.loss / self.accum_steps).backward()
            loss_sum += out.loss.detach() / self.accum_steps
        if tc.grad_clip > 0:
            # Under FSDP the norm is a DTensor over the gradient shards; its full value is the global norm.
            grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip))
        else:
            grad_norm = torch.zeros((), device=self.device)
        # At log steps: gradient and relative update norms per part of the model (why does the loop
        # learn slower per step? its gradient sums S iterations; docs/RESULTS.md, "Per step").
        watch = (self.step + 1) % tc.log_every == 0 and not self.dist.shards_model
        before = {n: p.detach().clone() for n, p in self.model.named_parameters()} if watch else None
        try:
            self.optimizer.step()
        except RuntimeError as exc:  # e.g. Adam's lr / bias correction beyond float range: a divergence too
            if "overflow" not in str(exc):
                raise
            raise self.diverged(f"the optimizer step overflowed ({exc})") from None
        if watch:
            self.part_stats = part_norms(self.model, before)
        if self.ema:
            self.ema.update(self.model)
        self.step += 1
        self.tokens += tc.batch_size * self.seq_len
        self.flops += tc.batch_size * train_flops(cfg.model, self.seq_len, num_loops)
        return loss_sum, num_loops, grad_norm

    def eval_model(self) -> torch.nn.Module:
        """The EMA weights in a separate module (MDLM evaluates and samples with EMA). Under FSDP
        every rank gets a whole, unsharded copy, so evaluation needs no collectives (rank 0 alone
        runs the loop diagnostics)."""
        if self.dist.shards_model:
            full = self.ema.full_state_dict() if self.ema else self.dist.model_state(self.model, to_all=True)
            model = LoopedDenoiser(self.cfg.model).to(self.device)
            state = model.state_dict()
            state.update({k: v.to(state[k].dtype) for k, v in full.items()})
            model.load_state_dict(state)
            return model
        if not self.ema:
            return self.model
        model = copy.deepcopy(self.model)
        self.ema.copy_to(model)
        return model

    def validate(self) -> dict:
        self.check_finite()
        cfg = self.cfg
        num_loops = cfg.model.max_train_loops if self.model.is_looped else 1
        model = self.eval_model()
        result = evaluate_nelbo(model, self.data.blocks("val"), self.schedule, [num_loops],
                                eps=cfg.diffusion.eps, batch_size=cfg.eval.batch_size,
                                num_batches=cfg.train.eval_batches, seed=cfg.eval.seed,
                                pad_id=self.data.pad_id if self.use_pad_mask else None,
                                prompt_len=self.data.prompt_len, prompt_sep_id=self.data.prompt_sep_id,
                                device=self.device, precision=cfg.train.precision)[0]
        if self.val_unigram is None:  # the floor on exactly the validated rows (computed once)
            blocks = self.data.blocks("val")
            self.val_unigram = self.data.unigram_xent(
                blocks[eval_rows(len(blocks), cfg.eval.batch_size, cfg.train.eval_batches)])
        record = {"kind": "val", "step": self.step, "val_nll": result["nll"], "val_ppl": result["ppl"],
                  "val_unigram_xent": self.val_unigram,
                  "val_loops": num_loops, "val_tokens": result["tokens"], "tokens": self.tokens,
                  "epoch": round(self.epoch, 4), "flops": self.flops, "time": round(self.train_time, 3)}
        if self.best_val is None or result["nll"] < self.best_val:
            # Early-stopping selection on validation (suites report these weights on test).
            state = self.ema.full_state_dict() if self.ema else self.dist.model_state(self.model)  # collective
            if self.dist.is_main:
                ckpt.save_best(self.run_dir, state, {k: record[k] for k in ("step", "val_nll", "tokens", "epoch", "flops")})
            self.best_val = result["nll"]
        record["best_val_nll"] = self.best_val
        self._log(record)
        if cfg.train.loop_diagnostics and self.model.is_looped and self.dist.is_main:
            self._log(self.loop_diagnostics_record(model))
        return record

    def loop_diagnostics_record(self, model) -> dict:
        """NELBO, hidden-state change and mask->mask attention for k = 1..S_max on 2 eval
        batches (analysis/loop_diagnostics.py), as one compact `loop_diag` record."""
        cfg = self.cfg
        diag = loop_diagnostics(model, self.data.blocks("val"), self.schedule, eps=cfg.diffusion.eps,
                                max_loops=cfg.model.max_train_loops, batch_size=cfg.eval.batch_size, num_batches=2,
                                seed=cfg.eval.seed, prompt_len=self.data.prompt_len, prompt_sep_id=self.data.prompt_sep_id, device=self.device,
                                pad_id=self.data.pad_id if self.use_pad_mask else None, precision=cfg.train.precision)
        return {"kind": "loop_diag", "step": self.step, "tokens": self.tokens, "flops": self.flops, **compact_record(diag)}

    def train(self) -> dict:
        tc = self.cfg.train
        # A step total only when steps are the budget; FLOPs- or time-bounded runs show a count.
        steps_bound = tc.max_steps > 0 and tc.max_flops == 0 and tc.max_minutes == 0
        bar = tqdm(total=tc.max_steps if steps_bound else None, initial=self.step, disable=not (tc.progress and self.dist.is_main),
                   dynamic_ncols=True, mininterval=1.0, unit="step")
        last_val = None
        with StopOnSignal() as stop:
            while not self._done():
                if self.dist.any(stop.requested):  # every rank stops after the same step
                    bar.close()
                    self.save()
                    if self.dist.is_main:
                        print(f"stopped by {stop.name} after step {self.step}; checkpoint saved, "
                              f"continue with --resume", file=sys.stderr)
                    raise KeyboardInterrupt
                t0, flops_before = time.perf_counter(), self.flops
                loss, num_loops, grad_norm = self.train_step()
                step_flops = self.flops - flops_before
                self.loss_accum += loss  # stays on the device: no host sync between log steps
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                step_time = time.perf_counter() - t0
                self.train_time += step_time
                self.interval["loops"] += num_loops
                self.interval["steps"] += 1
                bar.update(1)
                if self.step % tc.log_every == 0 or self._done():
                    # The logged loss is the mean over the steps since the previous record.
                    loss_value = float(self.dist.mean(self.loss_accum)) / self.interval["steps"]
                    if not math.isfinite(loss_value):
                        bar.close()
                        self.check_finite(loss_value)
                    record = {"kind": "train", "step": self.step, "loss": loss_value,
                              "lr": learning_rate(self.step - 1, tc, tc.max_steps or None),
                              "loops": num_loops, "loops_mean": self.interval["loops"] / self.interval["steps"],
                              "grad_norm": float(grad_norm), "tokens": self.tokens, "epoch": round(self.epoch, 4),
                              "flops": self.flops,
                              "time": round(self.train_time, 3),
                              "tokens_per_sec": round(tc.batch_size * self.seq_len / max(step_time, 1e-9), 1),
                              "flops_per_sec": round(step_flops / max(step_time, 1e-9), 1),
                              **getattr(self, "part_stats", {})}
                    self._log(record)
                    self.interval = {"loops": 0, "steps": 0}
                    self.loss_accum.zero_()
                    bar.set_postfix(loss=f"{loss_value:.3f}", S=num_loops, ep=f"{self.epoch:.1f}",
                                    tok_s=f"{record['tokens_per_sec']:.0f}", PFLOP=f"{self.flops / 1e15:.3f}")
                if tc.eval_every and self.step % tc.eval_every == 0 and not self._done():
                    last_val = self.validate()
                    bar.write(f"step {self.step}: val NELBO {last_val['val_nll']:.4f} (PPL <= {last_val['val_ppl']:.2f}, S={last_val['val_loops']})")
                if self.step % tc.checkpoint_every == 0 and not self._done():
                    self.save()
        bar.close()
        last_val = self.last_val_record() if self.step == self.resumed_step else None
        if last_val is not None:  # --resume of a finished run: nothing to train, log or save
            if self.dist.is_main:
                note(f"the run already reached its budget at step {self.step}; nothing to do "
                     f"(raise train.max_steps / max_flops / max_minutes to train further)")
        else:
            last_val = self.validate()
            self.save()
        best = ckpt.read_best_info(self.run_dir) or {}
        return {"step": self.step, "tokens": self.tokens, "epochs": round(self.epoch, 4), "flops": self.flops,
                "train_time": self.train_time,
                "val_nll": last_val["val_nll"], "val_ppl": last_val["val_ppl"], "val_loops": last_val["val_loops"],
                "val_unigram_xent": last_val["val_unigram_xent"],
                "best_val_nll": best.get("val_nll"), "best_step": best.get("step"), "best_epoch": best.get("epoch"),
                "best_flops": best.get("flops")}
