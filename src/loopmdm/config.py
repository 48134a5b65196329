"""Typed configuration: dataclasses, YAML presets and `key=value` overrides.

Parsing, merging and type checking are done by OmegaConf's structured configs (unknown
keys and wrong types are rejected there). `load_config` then runs two explicit steps:
`resolve()` fills in what other settings decide (the model's sigma(t) schedule from
diffusion.*, a task's length and tokenizer); `validate()` only checks -- range checks that
types cannot express and the option names of `loopmdm.names` -- and changes nothing.
Every failure becomes one `LoopMDMError` line naming the key and value.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from loopmdm.errors import LoopMDMError, require
from loopmdm.names import (BLOCK_STYLES, DETOKENIZERS, DEVICES, LR_SCHEDULES, PACKINGS, PARALLELISMS, PRECISIONS,
                           SAMPLERS, SCHEDULES, SOURCES, TASKS, TIME_INPUTS, TOKENIZERS)

# Presets are package data (src/loopmdm/configs/, read with importlib.resources), so an
# installed wheel finds them from any working directory; `configs/` at the repository root
# is a link to the same folder.
PRESETS = "configs"

# Prepared data lives in one user cache, whatever the working directory, so `loopmdm train tiny`
# from another folder finds the data prepared before instead of preparing it again.
CACHE_ENV = "LOOPMDM_CACHE_DIR"
# The default data.cache_dir before the user cache: relative to wherever a command ran. Run
# configs saved with it are read as today's default (config_from_dict).
LEGACY_CACHE_DIR = "data_cache"


def user_cache_dir() -> Path:
    """$LOOPMDM_CACHE_DIR if set, else $XDG_CACHE_HOME/loopmdm (XDG: only an absolute path
    counts), else ~/.cache/loopmdm."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "loopmdm"


@dataclass
class ModelConfig:
    block: str = "dit"  # "dit" (MDLM's DDiT with adaLN) or "llama" (RMSNorm, SwiGLU)
    vocab_size: int = 0  # real tokens; 0 = take it from the prepared data. mask id = vocab_size
    n_layers: int = 12
    d_model: int = 768
    n_heads: int = 12
    mlp_ratio: float = 4.0
    cond_dim: int = 128  # width of the adaLN conditioning vector (MDLM: 128)
    time_conditioning: bool = False  # MDLM default: time-agnostic denoiser
    # What the timestep embedder of a time-conditioned DiT sees: "sigma" = MDLM's total noise
    # -log alpha(t) of the schedule; "1000t" = DiT's 0..1000 timestep scale.
    time_input: str = "sigma"
    # The schedule sigma(t) is computed from: resolve() copies diffusion.schedule/eps here,
    # so the model (and a saved run's config) carries it; set it only on a hand-built ModelConfig.
    noise_schedule: str = "loglinear"
    noise_eps: float = 1e-3
    dropout: float = 0.0  # residual dropout after attention-out and after the MLP (MDLM)
    attention_dropout: bool = False  # true: model.dropout also on the attention probabilities (MDLM: none)
    rope_base: float = 10000.0
    # The loop (paper Sec. 3): layers [loop_start, loop_end) run num_loops times with
    # shared weights. Both None = no loop = the plain MDM baseline.
    loop_start: Optional[int] = 1
    loop_end: Optional[int] = 3
    max_train_loops: int = 12  # S ~ U{1..max_train_loops} per training step
    # Ablations, off by default (not the paper's method).
    input_injection: bool = False  # re-add the prelude output before each iteration
    grad_loops: int = 0  # >0: only the last k iterations carry gradients (truncated BPTT)
    checkpoint_loops: bool = False  # activation checkpointing per loop iteration
    # true: causal attention and a next-token loss instead of the diffusion NELBO -- the
    # autoregressive judge of generative perplexity (evaluation/judge.py), not a diffusion model.
    causal: bool = False

    @property
    def is_looped(self) -> bool:
        return self.loop_start is not None

    @property
    def n_loop_layers(self) -> int:
        return (self.loop_end - self.loop_start) if self.is_looped else 0


@dataclass
class DiffusionConfig:
    schedule: str = "loglinear"  # alpha_t schedule of the absorbing forward process
    eps: float = 1e-3  # t is drawn from [eps, 1] (MDLM's sampling_eps)
    antithetic: bool = True  # stratified t across the batch (MDLM)


@dataclass
class DataConfig:
    # embedded corpus (plays + news) | "shakespeare" (the embedded plays alone) | local "text"
    # files | "hf" datasets
    source: str = "embedded"
    paths: List[str] = field(default_factory=list)  # files or globs for source=text
    hf_name: str = ""  # e.g. "lm1b", "Skylion007/openwebtext"
    hf_config: str = ""
    hf_train_split: str = "train"
    hf_val_split: str = ""  # empty: carve validation out of the train split by document
    hf_text_field: str = "text"
    hf_max_docs: int = 0  # 0 = all
    detokenizer: str = ""  # "" | lm1b: MDLM's LM1B detokenizer before tokenizing (data/corpus.py DETOKENIZERS)
    num_proc: int = 0  # tokenizer worker processes (0 = cores, at most 8); never changes the output
    tokenizer: str = "bpe"  # bpe (trained here) | char (the train split's characters) | gpt2 | bert-base-uncased
    tokenizer_path: str = ""  # gpt2/bert: local files (offline); bpe: a tokenizer.json to reuse instead of training
    bpe_vocab_size: int = 2048
    seq_len: int = 128
    packing: str = "wrap"  # wrap: docs + EOS concatenated and cut; pad: one doc per row
    val_fraction: float = 0.05
    # > 0: a test split of whole documents, never read by training, sweeps or early stopping
    # (suites select on validation and report on test). 0 = train and validation only.
    test_fraction: float = 0.0
    split_seed: int = 0
    # > 0: train on only the first this-many tokens of the train split (whole blocks), seen
    # again every epoch: the data-scarce regime of the paper's budgets (tens of epochs).
    # Never changes the prepared bytes; validation and test are untouched.
    train_tokens: int = 0
    cache_dir: str = ""  # where prepared data lives; empty: the user cache (cache_root)
    # source=task: a synthetic task from loopmdm.tasks (TASKS); its own vocabulary and length
    # replace data.tokenizer and data.seq_len. train examples; validation gets val_fraction of that.
    task: str = "sudoku"
    task_size: int = 6  # sudoku: board side (4, 6, 9); khop: number of nodes
    task_hops: int = 3  # khop: answer slots (hops 1..task_hops), at most task_size // 2
    task_examples: int = 100000
    # false: train on the whole sequence (prompt positions may be masked too, a denser signal
    # for learning look-ups); evaluation always gives the prompt and scores the answers.
    task_prompt_given: bool = True
    # Random validity-preserving symmetries of every training batch (tasks that define them:
    # sudoku), seeded per step so a resumed run repeats them. Never changes the prepared bytes.
    task_augment: bool = False

    def cache_root(self) -> Path:
        """The folder prepared data lives in: data.cache_dir when set, else the user cache.
        Resolved here, at use, and never stored: a saved config keeps what was asked for."""
        return Path(self.cache_dir).expanduser() if self.cache_dir else user_cache_dir()


@dataclass
class TrainConfig:
    out_dir: str = ""  # empty: runs/<preset name>
    # A run directory whose weights (EMA) start this run instead of a random init: fine-tuning
    # (`data.source=pairs`). Its model config and tokenizer must match this run's.
    init_from: str = ""
    init_weights: str = "latest"  # with init_from: its newest weights, or "best" (its best validation NELBO)
    seed: int = 0
    batch_size: int = 32  # sequences per optimizer step, summed over ranks and micro-steps
    micro_batch_size: int = 0  # 0 = batch_size / world_size (no accumulation)
    max_steps: int = 1000
    max_flops: float = 0.0  # >0: also stop once cumulative training FLOPs reach this
    max_minutes: float = 0.0  # >0: also stop after this much wall time (demos)
    lr: float = 3e-4
    lr_schedule: str = "constant"  # after warm-up (MDLM: constant)
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    warmup_steps: int = 2500
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    ema: float = 0.9999  # 0 disables EMA
    precision: str = "auto"  # auto = bf16 autocast when the device supports it
    device: str = "auto"
    # Under torchrun: "ddp" (every rank holds the whole model) or "fsdp" (FSDP2: weights,
    # gradients, optimizer state and EMA sharded per block); training/distributed.py.
    parallel: str = "ddp"
    # torch.compile each transformer block (training/speed.py); the loop stays eager, so a
    # new S per step does not recompile. Off by default: compiling costs time up front.
    compile: bool = False
    log_every: int = 10
    eval_every: int = 200  # 0 = only at the end
    eval_batches: int = 8
    checkpoint_every: int = 200
    progress: bool = True  # live progress bar on stderr
    # Loop-training knobs from the looped-model literature (ours, off by default; docs/RESULTS.md):
    loop_lr_scale: float = 1.0  # lr of the loop block / train.lr (weight sharing sums S gradients)
    loops_from_step: int = 0  # S = 1 before this step, then S ~ U{1..S_max} (loop switched on partway)
    # At each validation of a looped model, a `loop_diag` record in metrics.jsonl: NELBO, hidden-state
    # change and mask->mask attention per iteration k = 1..S_max on 2 eval batches (analysis/).
    loop_diagnostics: bool = True


@dataclass
class EvalConfig:
    loops: List[int] = field(default_factory=lambda: [1, 4, 12, 24])
    batch_size: int = 32
    num_batches: int = 0  # 0 = the whole split
    draws: int = 1  # Monte-Carlo draws of t per sequence (MDLM: 1, SMDM/LLaDA: 128)
    seed: int = 1234


@dataclass
class SampleConfig:
    sampler: str = "cache"
    steps: int = 128
    num_loops: int = 12
    num_samples: int = 4
    temperature: float = 1.0
    seed: int = 0


@dataclass
class Config:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        return asdict(self)


def _one_line(exc: Exception) -> str:
    """OmegaConf messages are multi-line; keep the first line and the offending key."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), "")
    head = lines[0] if lines else type(exc).__name__
    return f"config error at '{key}': {head}" if key else f"config error: {head}"


def preset_names() -> list[str]:
    """The presets shipped with the package: `tiny`, ..., and the suites' `experiments/<suite>`."""
    root = resources.files("loopmdm").joinpath(PRESETS)
    names = []
    for entry in root.iterdir():
        if entry.is_dir():
            names += [f"{entry.name}/{sub.name[:-5]}" for sub in entry.iterdir() if sub.name.endswith(".yaml")]
        elif entry.name.endswith(".yaml"):
            names.append(entry.name[:-5])
    return sorted(names, key=lambda n: ("/" in n, n))


def _load_yaml(name_or_path: str):
    """A preset name (`tiny`, `experiments/khop`) from the package's presets, or a path to a
    YAML file, parsed (not yet merged)."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") or path.exists()):
        preset = resources.files("loopmdm").joinpath(PRESETS, *f"{name_or_path}.yaml".split("/"))
        require(preset.is_file(), f"unknown preset '{name_or_path}'; presets: {', '.join(preset_names())}")
        with resources.as_file(preset) as file:
            return _parse_yaml(file, name_or_path)
    require(path.is_file(), f"config file '{name_or_path}' does not exist")
    return _parse_yaml(path, name_or_path)


def _parse_yaml(path: Path, label: str):
    try:
        return OmegaConf.load(path)
    except Exception as exc:  # YAML syntax errors
        raise LoopMDMError(f"cannot parse config file '{label}': {_one_line(exc)}") from None


def load_config(name_or_path: str | None = None, overrides: List[str] | None = None) -> Config:
    """Defaults <- YAML preset <- `key=value` overrides, then validated."""
    schema = OmegaConf.structured(Config)
    layers = [schema]
    if name_or_path is not None:
        path = name_or_path
        layer = _load_yaml(name_or_path)
        # An empty file would silently mean the 12 x 768 defaults; a list is not a config.
        require(OmegaConf.is_dict(layer), f"config file '{path}' must map sections to settings "
                                          f"(model:, data:, train:, ...), not a {'list' if OmegaConf.is_list(layer) else 'value'}")
        require(len(layer) > 0, f"config file '{path}' is empty; give settings or use a preset (e.g. tiny)")
        layers.append(layer)
    for item in overrides or []:
        require("=" in item, f"override '{item}' is not of the form key=value (e.g. train.max_steps=100)")
    for item in overrides or []:
        key, _, value = item.partition("=")
        if value == "" and isinstance(OmegaConf.select(schema, key, default=None), str):
            item = f"{key}=''"  # `data.cache_dir=` means the empty string (its default), not null
        try:
            layers.append(OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise LoopMDMError(_one_line(exc)) from None
        except Exception as exc:  # YAML syntax of the value, e.g. an unquoted '*'
            raise LoopMDMError(f"override '{item}' has a value that is not valid YAML "
                               f"({str(exc).splitlines()[0]}); quote it, e.g. key='value'") from None
    try:
        merged = OmegaConf.merge(*layers)
        cfg: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise LoopMDMError(_one_line(exc)) from None
    if name_or_path is not None and cfg.name == "custom":
        cfg.name = Path(name_or_path).stem
    if not cfg.train.out_dir:
        cfg.train.out_dir = os.path.join("runs", cfg.name)
    resolve(cfg)
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config saved in a run directory (no preset layer)."""
    model = data.get("model") if isinstance(data, dict) else None
    if isinstance(model, dict) and "time_input" not in model:
        # Saved before model.time_input existed: those runs were trained on 1000·t and with
        # dropout on the attention probabilities; keep reading them as they were trained.
        data = {**data, "model": {**model, "time_input": "1000t", "attention_dropout": True}}
    saved_data = data.get("data") if isinstance(data, dict) else None
    if isinstance(saved_data, dict) and saved_data.get("cache_dir") == LEGACY_CACHE_DIR:
        # Saved when ./data_cache was the default, not a choice: data prepared again for this
        # run goes to today's default, the user cache (RUN/data.json still names the old folder).
        data = {**data, "data": {**saved_data, "cache_dir": ""}}
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(data))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise LoopMDMError(_one_line(exc)) from None
    resolve(cfg)
    validate(cfg)
    return cfg


def resolve(cfg: Config) -> None:
    """Fill in the settings that others decide (in place): the model learns sigma(t) of the
    training schedule (so a saved run's config carries it), and a synthetic task fixes the
    sequence length and brings its own tokenizer (the task's spec also checks its size and
    hops)."""
    cfg.model.noise_schedule, cfg.model.noise_eps = cfg.diffusion.schedule, cfg.diffusion.eps  # the model's sigma(t)
    da = cfg.data
    if da.source == "task":
        from loopmdm.names import TASKS
        from loopmdm.tasks import get_task

        task = get_task(da.task)
        task.check(da.task_size, da.task_hops)
        require(not da.task_augment or task.augment is not None,
                f"data.task_augment=true: task '{da.task}' defines no symmetries; tasks with them: "
                + ", ".join(name for name in TASKS if get_task(name).augment is not None))
        da.seq_len = task.seq_len(da.task_size, da.task_hops)  # the task fixes the length
        da.tokenizer = "task"
    else:
        require(not da.task_augment, f"data.task_augment=true is for data.source=task (got data.source={da.source})")


def _choice(key: str, value: str, allowed: tuple) -> None:
    require(value in allowed, f"{key}='{value}' is not allowed; choose one of: {', '.join(allowed)}")


def _positive(key: str, value, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    require(ok, f"{key}={value} must be {'>= 0' if allow_zero else '> 0'}")


def _require_finite(prefix: str, section) -> None:
    """Every float setting is a finite number (inf or nan trains with a NaN loss from step 1)."""
    for f in fields(section):
        value = getattr(section, f.name)
        require(not (isinstance(value, float) and not math.isfinite(value)),
                f"{prefix}.{f.name}={value} must be a finite number")


def validate_model(m: ModelConfig) -> None:
    _require_finite("model", m)
    _choice("model.block", m.block, BLOCK_STYLES)
    _positive("model.vocab_size", m.vocab_size, allow_zero=True)
    for key in ("n_layers", "d_model", "n_heads", "cond_dim", "max_train_loops"):
        _positive(f"model.{key}", getattr(m, key))
    _positive("model.mlp_ratio", m.mlp_ratio)
    require(int(m.mlp_ratio * m.d_model) >= 1, f"model.mlp_ratio={m.mlp_ratio} gives an MLP of width 0 at d_model={m.d_model}")
    _positive("model.rope_base", m.rope_base)
    require(m.d_model % m.n_heads == 0,
            f"model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads}")
    require((m.d_model // m.n_heads) % 2 == 0,
            f"model head dim {m.d_model // m.n_heads} must be even for rotary embeddings")
    require(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1)")
    require((m.loop_start is None) == (m.loop_end is None),
            f"model.loop_start={m.loop_start} and model.loop_end={m.loop_end}: set both or neither")
    if m.is_looped:
        require(0 <= m.loop_start < m.loop_end <= m.n_layers,
                f"loop range [{m.loop_start}, {m.loop_end}) must satisfy "
                f"0 <= loop_start < loop_end <= n_layers={m.n_layers}")
    _positive("model.grad_loops", m.grad_loops, allow_zero=True)
    _choice("model.time_input", m.time_input, TIME_INPUTS)
    _choice("model.noise_schedule", m.noise_schedule, SCHEDULES)
    require(0.0 <= m.noise_eps < 1.0, f"model.noise_eps={m.noise_eps} must be in [0, 1)")
    if m.block == "llama":
        require(not m.time_conditioning, "model.time_conditioning=true needs model.block=dit (adaLN)")
    if m.causal:
        require(not m.is_looped and not m.time_conditioning,
                "model.causal=true (the autoregressive judge) needs no loop (model.loop_start=null "
                "model.loop_end=null) and model.time_conditioning=false")


def validate(cfg: Config) -> None:
    """Range and name checks of a resolved config; changes nothing and imports nothing."""
    for section in ("diffusion", "data", "train", "eval", "sample"):
        _require_finite(section, getattr(cfg, section))
    d = cfg.diffusion
    _choice("diffusion.schedule", d.schedule, SCHEDULES)
    require(0.0 <= d.eps < 1.0, f"diffusion.eps={d.eps} must be in [0, 1)")
    validate_model(cfg.model)
    da = cfg.data
    _choice("data.source", da.source, SOURCES)
    _choice("data.tokenizer", da.tokenizer, TOKENIZERS)
    _choice("data.packing", da.packing, PACKINGS)
    text_tokenizers = tuple(t for t in TOKENIZERS if t != "task")
    require(da.tokenizer != "task" or da.source == "task",
            f"data.tokenizer=task is the vocabulary of a synthetic task (data.source=task); data.source={da.source} "
            f"needs a text tokenizer: one of {', '.join(text_tokenizers)}")
    if da.source != "task":  # a task's length is its own (resolve)
        require(da.seq_len >= 8, f"data.seq_len={da.seq_len} must be >= 8")
    require(da.bpe_vocab_size >= 260, f"data.bpe_vocab_size={da.bpe_vocab_size} must be >= 260 (bytes + specials)")
    require(0.0 < da.val_fraction < 1.0, f"data.val_fraction={da.val_fraction} must be in (0, 1)")
    require(0.0 <= da.test_fraction < 1.0 and da.val_fraction + da.test_fraction < 1.0,
            f"data.test_fraction={da.test_fraction} must be in [0, 1) with data.val_fraction + data.test_fraction < 1 "
            f"(data.val_fraction={da.val_fraction})")
    require(da.test_fraction == 0.0 or da.source != "pairs",
            f"data.test_fraction={da.test_fraction} is for text and task sources; data.source=pairs is scored on "
            f"its own test pairs")
    require(da.train_tokens >= 0, f"data.train_tokens={da.train_tokens} must be >= 0 (0 = the whole train split)")
    if da.source == "text":
        require(len(da.paths) > 0, "data.source=text needs data.paths=[file or glob, ...]")
    if da.source == "pairs":
        require(len(da.paths) > 0, "data.source=pairs needs data.paths=[a JSONL file of {\"prompt\": ..., \"answer\": ...} lines, ...]")
    if da.source == "hf":
        require(bool(da.hf_name), "data.source=hf needs data.hf_name (a datasets name or local path)")
    _choice("data.detokenizer", da.detokenizer, ("",) + tuple(DETOKENIZERS))
    require(da.num_proc >= 0, f"data.num_proc={da.num_proc} must be >= 0 (0 = one per core, at most 8)")
    if da.source == "task":
        _choice("data.task", da.task, tuple(TASKS))
        _positive("data.task_examples", da.task_examples)
    t = cfg.train
    for key in ("batch_size", "log_every", "eval_batches", "checkpoint_every"):
        _positive(f"train.{key}", getattr(t, key))
    for key in ("micro_batch_size", "max_steps", "max_flops", "max_minutes", "eval_every",
                "warmup_steps", "weight_decay", "grad_clip"):
        _positive(f"train.{key}", getattr(t, key), allow_zero=True)
    require(t.max_steps > 0 or t.max_flops > 0 or t.max_minutes > 0,
            "set one of train.max_steps, train.max_flops, train.max_minutes to a positive value")
    _positive("train.lr", t.lr)
    _positive("train.loop_lr_scale", t.loop_lr_scale)
    _positive("train.loops_from_step", t.loops_from_step, allow_zero=True)
    require(0.0 <= t.min_lr_ratio <= 1.0, f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    require(0.0 <= t.beta1 < 1.0 and 0.0 <= t.beta2 < 1.0, f"train.beta1/beta2=({t.beta1}, {t.beta2}) must be in [0, 1)")
    require(0.0 <= t.ema < 1.0, f"train.ema={t.ema} must be in [0, 1)")
    _choice("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    _choice("train.precision", t.precision, PRECISIONS)
    _choice("train.init_weights", t.init_weights, ("latest", "best"))
    _choice("train.device", t.device, DEVICES)
    _choice("train.parallel", t.parallel, PARALLELISMS)
    if t.micro_batch_size:
        require(t.batch_size % t.micro_batch_size == 0,
                f"train.batch_size={t.batch_size} must be a multiple of train.micro_batch_size={t.micro_batch_size}")
    e = cfg.eval
    require(len(e.loops) > 0 and all(s >= 1 for s in e.loops), f"eval.loops={list(e.loops)} must be loop counts >= 1")
    for key in ("batch_size", "draws"):
        _positive(f"eval.{key}", getattr(e, key))
    _positive("eval.num_batches", e.num_batches, allow_zero=True)
    s = cfg.sample
    _choice("sample.sampler", s.sampler, tuple(SAMPLERS))
    for key in ("steps", "num_loops", "num_samples"):
        _positive(f"sample.{key}", getattr(s, key))
    _positive("sample.temperature", s.temperature, allow_zero=True)
