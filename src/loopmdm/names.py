"""The option names a config is checked against: the bottom room (imports nothing but errors).

Each fixed axis is listed once here, and the module that implements it keys its registry by
these names (a test checks that they agree): blocks (model/blocks.py BLOCKS), noise schedules
(diffusion/schedule.py), detokenizers (data/corpus.py), parallelisms (training/distributed.py).

The pluggable axes a config names -- tasks and samplers -- are registries here: one line per
entry, name -> "module:ATTRIBUTE", the spec object defined in the module that implements it
(a `tasks.Task`, a `sampling.samplers.Sampler`). The line is a string, not an import, so this
room stays at the bottom and torch-free; `lookup` imports the spec on first use. Adding a task
or a sampler is one new file plus one line here. (Loop schedules, pair sources and suites are
not config names: their registries live beside their code, `LOOP_SCHEDULES`, `PAIR_SOURCES`,
`SUITES`.)
"""

from __future__ import annotations

import importlib

from loopmdm.errors import require

BLOCK_STYLES = ("dit", "llama")
SCHEDULES = ("loglinear", "linear", "cosine")
TIME_INPUTS = ("sigma", "1000t")
SOURCES = ("embedded", "shakespeare", "text", "hf", "task", "pairs")
TOKENIZERS = ("bpe", "char", "gpt2", "bert-base-uncased", "task")
DETOKENIZERS = ("lm1b",)  # data.detokenizer ("" = none)
PACKINGS = ("wrap", "pad")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
PARALLELISMS = ("ddp", "fsdp")

# data.task (data.source=task): the synthetic depth-hungry tasks (loopmdm/tasks/).
TASKS = {
    "sudoku": "loopmdm.tasks.sudoku:TASK",
    "khop": "loopmdm.tasks.khop:TASK",
}
# sample.sampler, `--sampler`: the samplers (loopmdm/sampling/).
SAMPLERS = {
    "ancestral": "loopmdm.sampling.samplers:ANCESTRAL",
    "cache": "loopmdm.sampling.samplers:CACHE",
    "confidence": "loopmdm.sampling.samplers:CONFIDENCE",
}


def lookup(registry: dict, name: str, what: str):
    """The spec object that `registry`'s line for `name` points at, imported on first use."""
    require(name in registry, f"{what} '{name}' is not allowed; choose one of: {', '.join(registry)}")
    module, _, attribute = registry[name].partition(":")
    return getattr(importlib.import_module(module), attribute)
