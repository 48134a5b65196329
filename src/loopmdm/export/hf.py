"""`loopmdm export RUN OUT_DIR`: a run as a Hugging Face model folder.

    from transformers import AutoModelForMaskedLM, AutoTokenizer
    model = AutoModelForMaskedLM.from_pretrained(OUT_DIR, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(OUT_DIR, trust_remote_code=True)

OUT_DIR/config.json             model_type "loopmdm", auto_map to the two files below, the model
                                fields of the run's config, num_loops (forward's default S)
OUT_DIR/configuration_loopmdm.py, modeling_loopmdm.py
                                copied from export/hf_template/: torch + transformers only,
                                the same computation as model/denoiser.py
OUT_DIR/model.safetensors       the run's state dict as it is (EMA weights unless --no-ema)
OUT_DIR/tokenizer.json          the run's tokenizer plus one special token, the diffusion
                                [MASK], at id vocab_size; tokenizer_config.json names it
OUT_DIR/loopmdm_config.yaml     the run's full config, and data.json: `load_run(OUT_DIR)`
                                (runs.py) reopens the folder, so `loopmdm eval/sample OUT_DIR` work
OUT_DIR/README.md               the model card: what the logits are, how to call it

Nothing here imports transformers: exporting is file writing; the test loads the result.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from loopmdm import __version__
from loopmdm.config import ModelConfig
from loopmdm.errors import require
from loopmdm.runfiles import disk_error
from loopmdm.runs import (EXPORT_CONFIG, EXPORT_RUN_CONFIG, EXPORT_TOKENIZER, EXPORT_WEIGHTS, LoadedRun,
                          is_export, load_run)

TEMPLATE_DIR = Path(__file__).resolve().parent / "hf_template"
TEMPLATE_FILES = ("configuration_loopmdm.py", "modeling_loopmdm.py")
TOKENIZER_CONFIG, MODEL_CARD, DATA_INFO = "tokenizer_config.json", "README.md", "data.json"
EXPORT_FILES = (EXPORT_CONFIG, EXPORT_RUN_CONFIG, EXPORT_WEIGHTS, EXPORT_TOKENIZER, TOKENIZER_CONFIG, MODEL_CARD,
                DATA_INFO) + TEMPLATE_FILES
# The ModelConfig fields the exported model needs (configuration_loopmdm.py has each); the
# others (grad_loops, checkpoint_loops) only change how training runs, `causal` is refused.
MODEL_FIELDS = ("vocab_size", "block", "n_layers", "d_model", "n_heads", "mlp_ratio", "cond_dim", "time_conditioning",
                "time_input", "noise_schedule", "noise_eps", "dropout", "attention_dropout", "rope_base",
                "loop_start", "loop_end", "max_train_loops", "input_injection")
MASK_TOKENS = ("<|mask|>", "<|loopmdm_mask|>")  # the first one the tokenizer does not have yet


def default_num_loops(run: LoadedRun) -> int:
    """S_max, the deepest loop count training used (also what validation reports); 1 unlooped."""
    return run.cfg.model.max_train_loops if run.model.is_looped else 1


def model_fields(m: ModelConfig) -> dict:
    """The LoopMDMConfig fields that rebuild the network of model config `m`."""
    return {key: getattr(m, key) for key in MODEL_FIELDS}


def hf_config(run: LoadedRun, num_loops: int, weights: str) -> dict:
    tok = run.tokenizer
    config = {"model_type": "loopmdm", "architectures": ["LoopMDMForMaskedLM"],
              "auto_map": {"AutoConfig": "configuration_loopmdm.LoopMDMConfig",
                           "AutoModelForMaskedLM": "modeling_loopmdm.LoopMDMForMaskedLM"}}
    config.update(model_fields(run.cfg.model))
    config.update({"num_loops": num_loops, "max_position_embeddings": run.cfg.data.seq_len,
                   "pad_token_id": tok.pad_id, "eos_token_id": tok.eos_id,
                   "bos_token_id": tok.bos_id, "tie_word_embeddings": False, "dtype": "float32",
                   "loopmdm_step": run.step, "loopmdm_weights": weights, "loopmdm_version": __version__})
    return config


def tokenizer_files(run: LoadedRun) -> tuple[str, dict]:
    """(tokenizer.json text, tokenizer_config.json): the run's tokenizer plus the mask token."""
    tok = run.tokenizer
    backend = type(tok.tok).from_str(tok.tok.to_str())  # a copy: the run's tokenizer stays as it is
    vocab = backend.get_vocab(with_added_tokens=True)
    mask = next((m for m in MASK_TOKENS if m not in vocab), None)
    require(mask is not None, f"the run's tokenizer already has every mask token name tried ({', '.join(MASK_TOKENS)})")
    backend.add_special_tokens([mask])
    require(backend.token_to_id(mask) == run.model.mask_id,
            f"the tokenizer gave the mask token id {backend.token_to_id(mask)}, the model's mask id is "
            f"{run.model.mask_id} (a tokenizer with holes in its ids cannot be exported)")
    name = backend.id_to_token
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "mask_token": mask, "pad_token": name(tok.pad_id),
              "eos_token": name(tok.eos_id), "model_max_length": run.cfg.data.seq_len,
              "clean_up_tokenization_spaces": False}
    if tok.bos_id is not None:
        config["bos_token"] = name(tok.bos_id)
    return backend.to_str(pretty=True), config


def model_card(run: LoadedRun, source: Path, out: Path, config: dict, mask_token: str) -> str:
    """README.md of the export; its python blocks run as written (tests/test_export.py)."""
    m, path = run.cfg.model, json.dumps(str(out))
    stages = (f"prelude = layers [0, {m.loop_start}), loop_block = layers [{m.loop_start}, {m.loop_end}) "
              f"run `num_loops` times with shared weights, coda = layers [{m.loop_end}, {m.n_layers})"
              if m.is_looped else f"no loop block: {m.n_layers} layers run once (the plain MDM baseline)")
    time_note = ("The run is time-conditioned: pass the diffusion time `t` in [0, 1] (shape (B,) or a scalar); "
                 f"the model embeds sigma(t) = -log alpha(t) of the `{m.noise_schedule}` schedule"
                 if m.time_conditioning and m.time_input == "sigma" else
                 "The run is time-conditioned: pass the diffusion time `t` in [0, 1]; the model embeds 1000 t"
                 if m.time_conditioning else
                 "The run is time-agnostic (MDLM's default): `t` is accepted and ignored")
    return f"""---
library_name: transformers
pipeline_tag: fill-mask
tags: [loopmdm, masked-diffusion, looped-transformer]
---

# LoopMDM (exported from `{source}`, step {run.step})

A looped masked diffusion language model ("Looped Diffusion Language Models", Lee et al.),
trained with the MDLM objective by the `loopmdm` package and exported with `loopmdm export`.
{run.model.num_params():,} parameters, {m.block} blocks, d_model {m.d_model}, {m.n_heads} heads;
{stages}. Weights: the run's {"EMA" if config["loopmdm_weights"] == "ema" else "raw (non-EMA)"} weights.

```python
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

model = AutoModelForMaskedLM.from_pretrained({path}, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained({path}, trust_remote_code=True)  # or False: it needs no code
x = tokenizer("The new phone {mask_token}{mask_token}{mask_token} today.", return_tensors="pt")
with torch.no_grad():
    out = model(**x, num_loops={config["num_loops"]})  # MaskedLMOutput; num_loops = S, any S >= 1
log_probs = out.logits.log_softmax(-1)  # p_theta(x_0 | x_t) at every position
```

Generation is iterative unmasking. A minimal greedy sampler (`loopmdm sample` has MDLM's
ancestral and cached samplers, halting and more): one token per call, the most confident one.

```python
ids = tokenizer("The new phone", return_tensors="pt").input_ids
ids = torch.cat([ids, torch.full((1, 8), tokenizer.mask_token_id)], dim=1)
with torch.no_grad():
    while (masked := ids == tokenizer.mask_token_id).any():
        # t: the log-linear schedule's time for this fraction of masks (time-agnostic runs ignore it)
        probs = model(input_ids=ids, num_loops={config["num_loops"]}, t=masked.float().mean(-1)).logits.softmax(-1)
        confidence, token = probs.max(-1)
        i = confidence.masked_fill(~masked, -1.0).argmax(-1)
        ids[0, i] = token[0, i]
print(tokenizer.decode(ids[0]))
```

Needs transformers >= 5 (the configuration is a v5 dataclass config) and torch; the modelling
code (`modeling_loopmdm.py`) imports nothing else.

## What the model computes

- Input `input_ids` is a partially masked sequence x_t: masked positions hold the diffusion mask
  token `{mask_token}` (id {run.model.mask_id} = `config.vocab_size` = `config.mask_id`,
  `tokenizer.mask_token_id`).
- `num_loops` (S): iterations of the shared loop block, default `config.num_loops` = {config["num_loops"]}
  (the largest S used in training, `max_train_loops` = {m.max_train_loops}; training drew
  S ~ U{{1..{m.max_train_loops}}}). More loops = more compute per call; any S >= 1 is allowed.
- `logits` has shape (B, L, {m.vocab_size}): the real tokens only. The mask token has no column:
  MDLM's SUBS parameterisation gives it probability zero, and leaving it out is the same. The
  values are the network's raw logits, the `loopmdm` package's `LoopedDenoiser` output (the same
  operations in the same order: bit for bit on CPU in its tests); `log_softmax(logits)` is p_theta(x_0 | x_t). Only masked positions are
  predictions: a sampler keeps unmasked tokens unchanged (SUBS carry-over).
- `attention_mask` (B, L): 1 = real token, 0 = padding hidden from every query.
- {time_note}.
- `output_hidden_states=True` returns (H^0, H^1, ..., H^S): the prelude output and each loop
  iteration's output.
- `labels` gives a plain cross-entropy over positions != -100, not the diffusion NELBO (which
  weights masked positions by -alpha'(t) / (1 - alpha(t)), 1/t for the log-linear schedule).
- `generate()` is not provided (see the sampler above). The `loopmdm` package reads this folder
  back: `loopmdm sample OUT_DIR`, `loopmdm eval OUT_DIR` (`loopmdm_config.yaml` is the run's
  full config, `data.json` where its prepared data lived).

Sequence length in training: {run.cfg.data.seq_len} tokens (RoPE; longer inputs run but are untrained).
Tokenizer: `{run.cfg.data.tokenizer}`, {m.vocab_size} tokens + the mask token; texts are encoded
without added special tokens, as in training.
"""


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    require(out.is_dir(), f"OUT_DIR '{out}' is a file; choose a folder")
    names = sorted(os.listdir(out))
    if not names:
        return
    require(overwrite, f"OUT_DIR '{out}' exists and is not empty; pass --overwrite to replace a loopmdm export, "
                       f"or choose a new folder")
    require(is_export(out), f"OUT_DIR '{out}' is not a loopmdm export (it holds {', '.join(names[:3])}"
                            f"{', ...' if len(names) > 3 else ''}) and --overwrite only replaces one; choose another OUT_DIR")
    foreign = [n for n in names if n not in EXPORT_FILES]
    require(not foreign, f"OUT_DIR '{out}' also holds files `loopmdm export` did not write ({', '.join(foreign[:3])}); "
                         f"move them or choose another OUT_DIR")


def export_run(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False, use_ema: bool = True,
               num_loops: int | None = None, best: bool = False) -> dict:
    """Write the Hugging Face folder of a run (or of another export); returns a summary. `best`:
    the run's best-on-validation weights (checkpoints/best.safetensors) instead of the newest."""
    run_dir, out = Path(run_dir), Path(out_dir)
    run = load_run(run_dir, device="cpu", use_ema=use_ema, best=best)
    require(not run.cfg.model.causal, f"run '{run_dir}' is an autoregressive judge (model.causal=true), not a "
                                      f"masked diffusion model; export exports diffusion runs")
    require(num_loops is None or (isinstance(num_loops, int) and num_loops >= 1),
            f"num_loops={num_loops} must be an integer >= 1")
    require(out.resolve() != run_dir.resolve(), f"OUT_DIR '{out}' is the run directory itself; choose a new folder")
    _check_out_dir(out, overwrite)
    num_loops = default_num_loops(run) if num_loops is None else num_loops
    if is_export(run_dir):  # re-exporting an export: its weights are what it says they are
        weights = json.loads((run_dir / EXPORT_CONFIG).read_text(encoding="utf-8")).get("loopmdm_weights", "ema")
    else:
        weights = "ema" if use_ema and run.cfg.train.ema > 0 else "raw"
    config = hf_config(run, num_loops, weights)
    tokenizer_json, tokenizer_config = tokenizer_files(run)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in run.model.state_dict().items()}

    # Assembled next to OUT_DIR, then renamed into place: no half-written export is left behind.
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / EXPORT_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(state, str(tmp / EXPORT_WEIGHTS), metadata={"format": "pt"})
        (tmp / EXPORT_TOKENIZER).write_text(tokenizer_json, encoding="utf-8")
        (tmp / TOKENIZER_CONFIG).write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
        (tmp / EXPORT_RUN_CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.structured(run.cfg)), encoding="utf-8")
        if (run.run_dir / DATA_INFO).is_file():  # where the run's prepared data lives: eval OUT_DIR finds it
            shutil.copyfile(run.run_dir / DATA_INFO, tmp / DATA_INFO)
        for name in TEMPLATE_FILES:
            shutil.copyfile(TEMPLATE_DIR / name, tmp / name)
        (tmp / MODEL_CARD).write_text(model_card(run, run_dir, out, config, tokenizer_config["mask_token"]), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)  # empty, or checked above to be an export holding only our files
        os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_error(exc, f"the export '{out}'") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out_dir": str(out), "run": str(run_dir), "step": run.step, "weights": weights, "num_loops": num_loops,
            "params": run.model.num_params(), "mask_token": tokenizer_config["mask_token"],
            "mask_token_id": run.model.mask_id, "files": sorted(os.listdir(out))}
