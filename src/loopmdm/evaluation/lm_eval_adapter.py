"""A trained run as an lm-evaluation-harness model: `lm_eval --model loopmdm`.

lm-eval 0.4.13 finds models only in its own registry (it reads no entry points), so the
`loopmdm` model exists once this module is imported. Two launchers do that and then hand
over to lm-eval's own CLI, unchanged:

    python -m loopmdm.evaluation.lm_eval_adapter --model loopmdm --batch_size auto \\
        --model_args path=RUN,loops=12,mc_samples=32 --tasks arc_easy --limit 200
    loopmdm lm-eval --model loopmdm --model_args path=RUN,loops=12 --tasks arc_easy

(In Python: `import loopmdm.evaluation.lm_eval_adapter` before `lm_eval.simple_evaluate`.)
Offline copies of the zero-shot benchmarks are under lm_eval_tasks/ (`--include_path`,
task names `loopmdm_<task>`; `loopmdm downstream` adds it for you).

model_args: path (run directory), loops (S, default 1), mc_samples (Monte-Carlo draws per
loglikelihood request, default 32), estimator (llada | mdlm, evaluation/likelihood.py),
seed, precision, ema (default true); lm-eval's --device (its default cuda:0 falls back to the
CPU when there is no GPU) and --batch_size:
requests per denoiser call (each is mc_samples + 1 rows; `auto`: at least 64 rows),
and for generate_until: steps, sampler, temperature, max_gen_toks.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import get_model, register_model

from loopmdm.diffusion.schedule import make_schedule
from loopmdm.errors import LoopMDMError, require
from loopmdm.evaluation.likelihood import ESTIMATORS, score_continuations
from loopmdm.evaluation.nelbo import evaluate_nelbo
from loopmdm.names import SAMPLERS

get_model("dummy")  # load lm-eval's own lazy model table first: it is skipped once the registry is non-empty


MODEL_ARGS = ("path", "loops", "mc_samples", "estimator", "seed", "precision", "ema", "steps", "sampler",
              "temperature", "max_gen_toks", "device", "batch_size")
LM_EVAL_OWN_ARGS = {"max_batch_size", "trust_remote_code"}


def _number(kind, name: str, value):
    try:
        number = kind(value)
        exact = kind is float or float(value) == number  # int(1.5) would silently give 1
    except (TypeError, ValueError):
        exact = False
    if exact:
        return number
    raise LoopMDMError(f"--model_args {name}={value} must be {'an integer' if kind is int else 'a number'}")


def _bool(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("loopmdm")
class LoopMDMLM(LM):
    """Scores and generates with a LoopMDM run at a fixed loop count S (`loops`)."""

    def __init__(self, path: str | None = None, loops: int = 1, mc_samples: int = 32, estimator: str = "llada",
                 seed: int = 1234, device: str | None = "auto", batch_size: int | str | None = "auto",
                 precision: str | None = None, ema: bool = True, steps: int | None = None, sampler: str = "confidence",
                 temperature: float = 0.0, max_gen_toks: int = 64, pretrained: str | None = None, **_ignored):
        super().__init__()
        from loopmdm.runs import load_run

        # --model_args come from the command line: a missing path or a non-number is one line, not a traceback.
        path = path or pretrained  # lm-eval's usual name for the model location
        # A misspelt option (loop=12) must not silently evaluate the defaults (S = 1); lm-eval
        # itself adds only these (its --max_batch_size, --trust_remote_code), which mean nothing here.
        unknown = sorted(set(_ignored) - LM_EVAL_OWN_ARGS)
        require(not unknown, f"--model_args {', '.join(unknown)}: not an option of --model loopmdm; it takes: "
                             f"{', '.join(MODEL_ARGS)}")
        require(path, "--model_args needs path=RUN (a run directory or a `loopmdm export` folder)")
        loops, mc_samples, seed, max_gen_toks = (_number(int, name, value) for name, value in (
            ("loops", loops), ("mc_samples", mc_samples), ("seed", seed), ("max_gen_toks", max_gen_toks)))
        steps = None if steps is None else _number(int, "steps", steps)
        temperature = _number(float, "temperature", temperature)
        require(loops >= 1, f"loops={loops} must be >= 1")
        require(mc_samples >= 1, f"mc_samples={mc_samples} must be >= 1")
        require(estimator in ESTIMATORS, f"estimator '{estimator}' is not allowed; choose one of: {', '.join(ESTIMATORS)}")
        require(sampler in SAMPLERS, f"sampler '{sampler}' is not allowed; choose one of: {', '.join(SAMPLERS)}")
        device = device or "auto"
        if device.startswith("cuda") and not torch.cuda.is_available():  # lm-eval's CLI default is cuda:0
            print(f"note: device '{device}' asked for but no CUDA device is available; using the CPU", file=sys.stderr)
            device = "cpu"
        self.run = load_run(path, device=device, use_ema=_bool(ema))
        cfg = self.run.cfg
        self.model, self.tok = self.run.model, self.run.tokenizer
        if not self.model.is_looped and loops != 1:
            print(f"note: {path} has no loop; loops={loops} gives the S=1 model", file=sys.stderr)
        self.loops, self.mc_samples, self.estimator, self.seed = loops, mc_samples, estimator, seed
        # lm-eval's batch_size counts requests; each brings mc_samples + 1 rows (the +1: is_greedy).
        per_request = mc_samples + 1
        self.rows_per_call = int(batch_size) * per_request if str(batch_size).isdigit() and int(batch_size) > 0 \
            else max(64, per_request)  # "auto" / unset
        self.precision = precision or cfg.train.precision
        self.schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.eps)
        self.eps, self.seq_len = cfg.diffusion.eps, cfg.data.seq_len
        self.steps, self.sampler, self.temperature = steps, sampler, float(temperature)
        self.max_gen_toks = max_gen_toks

    @property
    def device(self):
        return self.run.device

    # ----------------------------------------------------------------- tokens
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's convention: trailing spaces of the context move to the continuation, and
        the continuation's ids are those of the joint text after the context's."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tok.encode(context + continuation)
        context_ids = self.tok.encode(context)
        return whole[:len(context_ids)], whole[len(context_ids):]

    # ----------------------------------------------------------------- lm-eval API
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(Monte-Carlo estimate of log p(continuation | context), is_greedy): see
        evaluation/likelihood.py. is_greedy: the one-call argmax of the fully masked
        continuation reproduces it."""
        pairs = []
        for req in requests:
            context, continuation = req.args
            ctx, cont = self._encode_pair(context, continuation)
            if not cont:  # e.g. an empty choice: fall back to the last context token
                ctx, cont = ctx[:-1], ctx[-1:]
            pairs.append((ctx, cont))
        from tqdm import tqdm

        bar = tqdm(total=len(pairs) * (self.mc_samples + 1), desc=f"loglikelihood S={self.loops}", unit="row",
                   disable=disable_tqdm, file=sys.stderr, leave=False, delay=2.0)
        scored = score_continuations(self.model, pairs, num_loops=self.loops, num_draws=self.mc_samples,
                                     schedule=self.schedule, eps=self.eps, estimator=self.estimator, seed=self.seed,
                                     batch_size=self.rows_per_call, max_len=self.seq_len, pad_id=self.tok.pad_id,
                                     device=self.device, precision=self.precision, progress=bar.update)
        bar.close()
        results = [(s.logprob, s.is_greedy) for s in scored]
        for req, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The NELBO bound of the whole text: cut into windows of the run's seq_len (the last
        one padded; pads are not scored), each window's NELBO estimated with mc_samples
        stratified draws of t (evaluation/nelbo.py, MDLM's estimator); returns -NELBO in nats."""
        out = []
        for req in requests:
            out.append(self.rolling_logprob(req.args[0]))
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, out[-1])
        return out

    def rolling_logprob(self, text: str) -> float:
        ids = self.tok.encode(text)
        if not ids:
            return 0.0
        n_windows = -(-len(ids) // self.seq_len)
        windows = np.full((n_windows, self.seq_len), self.tok.pad_id, dtype=np.int64)
        windows.reshape(-1)[:len(ids)] = ids
        # Each window repeated mc_samples times in one batch: the antithetic t's of a batch
        # are then stratified over the draws of each window.
        blocks = np.repeat(windows, self.mc_samples, axis=0)
        r = evaluate_nelbo(self.model, blocks, self.schedule, [self.loops], eps=self.eps, batch_size=self.mc_samples,
                           seed=self.seed, pad_id=self.tok.pad_id, device=self.device, precision=self.precision)[0]
        return -r["nll"] * len(ids)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """The context as a fixed prompt, max_gen_toks masked positions after it, filled by the
        run's sampler (default: LLaDA's low-confidence remasking, greedy); the text is cut at
        the first `until` string or EOS."""
        from loopmdm.sampling.generate import SamplerSpec, generate

        out = []
        for req in requests:
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n_gen = max(1, min(int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)), self.seq_len - 1))
            temperature = float(gen_kwargs.get("temperature", self.temperature)) if gen_kwargs.get("do_sample", True) else 0.0
            prompt = self.tok.encode(context)[-(self.seq_len - n_gen):]
            template = torch.full((1, len(prompt) + n_gen), self.model.mask_id, dtype=torch.long)
            template[0, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
            result, _ = generate(self.model, self.run.cfg, template.to(self.device), SamplerSpec(str(self.loops)),
                                 steps=self.steps or n_gen, sampler=self.sampler, temperature=temperature, seed=self.seed)
            ids = result.tokens[0, len(prompt):].cpu().tolist()
            ids = ids[:ids.index(self.tok.eos_id)] if self.tok.eos_id in ids else ids  # EOS ends the text too
            text = self.tok.decode(ids)
            out.append(cut_at(text, until))
            self.cache_hook.add_partial("generate_until", req.args, out[-1])
        return out


def cut_at(text: str, until: list[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    ends = [text.find(s) for s in until if s and s in text]
    return text[:min(ends)] if ends else text


def main() -> None:
    """lm-eval's own CLI with the `loopmdm` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
