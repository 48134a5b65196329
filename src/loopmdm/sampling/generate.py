"""Sampling from a trained model, with its compute accounted: the one path `loopmdm sample`
and `loopmdm sample-bench` share."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from loopmdm.config import Config
from loopmdm.diffusion.schedule import make_schedule
from loopmdm.sampling.loop_runner import Halting, LoopRunner
from loopmdm.sampling.loop_schedule import LoopSchedule, describe, parse_loop_schedule
from loopmdm.sampling.samplers import SampleResult, sample


@dataclass(frozen=True)
class SamplerSpec:
    """One point on the quality/compute curve: a loop schedule (the cap per call), optional
    adaptive halting and warm start."""

    loops: str  # a parse_loop_schedule spelling: "8", "noise:2:12", "linear:12:2"
    halting: Halting | None = None
    warm_start: bool = False

    @property
    def schedule(self) -> LoopSchedule:
        return parse_loop_schedule(self.loops)

    @property
    def label(self) -> str:
        text = f"S={describe(self.schedule)}"
        if self.halting is not None:
            h = self.halting
            rule = "" if h.rule == "change" else f" {h.rule}"
            cap = describe(self.schedule) if h.cap is None else f"min({describe(self.schedule)}, {h.cap})"
            text = f"halt-{h.granularity}{rule} tau={h.tau:g} (S in [{h.min_loops}, {cap}])"
        return text + (" +warm" if self.warm_start else "")


def generate(model, cfg: Config, template: torch.Tensor, spec: SamplerSpec, *, steps: int, sampler: str,
             temperature: float = 1.0, seed: int = 0, on_step=None, on_call=None) -> tuple[SampleResult, dict]:
    """Fill the masked positions of `template` (B, L). Returns the sampler's result and the
    compute accounting: denoiser calls, loops per call (mean, histogram), FLOPs per generated
    token, wall time, samples per second."""
    device = template.device
    runner = LoopRunner(model, halting=spec.halting, warm_start=spec.warm_start, precision=cfg.train.precision)

    def denoiser(x, num_loops, t):
        logits = runner(x, num_loops, t)
        if on_call is not None:
            on_call(runner.records[-1])
        return logits

    def stepped(i, x):
        runner.step = i + 1  # the calls that follow serve the next denoising step
        if on_step is not None:
            on_step(i, x)

    generator = torch.Generator(device=device).manual_seed(seed)
    generated = int((template == model.mask_id).sum())
    start = time.perf_counter()
    result = sample(denoiser, mask_id=model.mask_id, x_init=template, steps=steps, loops=spec.schedule,
                    sampler=sampler, schedule=make_schedule(cfg.diffusion.schedule, cfg.diffusion.eps),
                    temperature=temperature, generator=generator, time_agnostic=not cfg.model.time_conditioning,
                    device=device, on_step=stepped)
    wall = time.perf_counter() - start
    stats = runner.stats(generated)
    stats.update({"label": spec.label, "loops": spec.loops, "sampler": sampler, "steps": steps,
                  "num_samples": int(template.shape[0]), "generated_tokens": generated,
                  "wall_s": wall, "samples_per_s": template.shape[0] / wall if wall > 0 else float("inf")})
    return result, stats
