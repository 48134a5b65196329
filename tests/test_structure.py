"""The house's shape: the import graph (floors, no circles), registries that agree with the
names config checks, and pluggable parts added as one new file plus one registry line."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

import loopmdm
from loopmdm import names
from loopmdm.config import load_config
from loopmdm.errors import LoopMDMError

ROOT = Path(loopmdm.__file__).parent

# Floors: a module imports only from its own floor or below (lazy imports inside functions count).
FLOORS = {
    "errors": 0, "names": 0, "boundary": 0,
    "config": 1,
    "runfiles": 2, "userfiles": 2, "devices": 2, "diffusion": 2, "tasks": 2,
    "model": 3, "checkpoint": 3, "data": 3,
    "sampling": 4, "runs": 4, "analysis": 4,
    "evaluation": 5, "export": 5, "training": 5,
    "experiments": 6,
    "cli": 7,
}
# The one exception, a lazy import in config.resolve() (not in validation): a task fixes
# data.seq_len and the tokenizer, and the tasks room imports nothing above errors.
ALLOWED_UP = {("loopmdm.config", "loopmdm.tasks")}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        if "hf_template" in path.parts:  # copied into exports; imports only torch and transformers
            continue
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _imports(path: Path, mods: dict, only_module_level: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if only_module_level else ast.walk(tree)
    found = set()
    for node in nodes:
        names_ = []
        if isinstance(node, ast.Import):
            names_ = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names_ = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names_:
            while name not in mods and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in mods and name != "loopmdm":
                found.add(name)
    return found


def _room(module: str) -> str:
    return module.split(".")[1] if "." in module else module


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(p, mods) - {m} for m, p in mods.items()}


def test_every_room_has_a_floor(graph):
    assert {_room(m) for m in graph if m != "loopmdm"} <= set(FLOORS)


def test_imports_go_down_only(graph):
    upward = sorted((m, t) for m, targets in graph.items() if m != "loopmdm" for t in targets
                    if FLOORS[_room(t)] > FLOORS[_room(m)] and (m, t) not in ALLOWED_UP)
    assert not upward, upward


def test_no_import_circles(graph):
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, "import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt])
            if nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_the_bottom_rooms(graph):
    mods = _modules()
    assert graph["loopmdm.errors"] == set() and graph["loopmdm.names"] <= {"loopmdm.errors"}
    # config, at module level, knows only the names; validation imports nothing at all
    assert _imports(mods["loopmdm.config"], mods, only_module_level=True) <= {"loopmdm.errors", "loopmdm.names"}
    tree = ast.parse(mods["loopmdm.config"].read_text())
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("validate")):
        assert not [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))], fn.name
    for name in ("loopmdm.names", "loopmdm.config", "loopmdm.errors"):  # torch-free
        top = {a.name.split(".")[0] for n in ast.parse(mods[name].read_text()).body
               if isinstance(n, ast.Import) for a in n.names}
        top |= {n.module.split(".")[0] for n in ast.parse(mods[name].read_text()).body
                if isinstance(n, ast.ImportFrom) and n.module}
        assert "torch" not in top and "numpy" not in top, name


def test_inference_and_tasks_stay_in_their_rooms(graph):
    def closure(start):
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph[m]
        return seen

    assert not {m for m in closure("loopmdm.runs") if m.startswith("loopmdm.training")}
    assert not {m for m in closure("loopmdm.tasks.pairs") if m.startswith("loopmdm.evaluation")}
    assert not {m for t in graph if t.startswith("loopmdm.tasks") for m in graph[t]
                if _room(m) in ("evaluation", "training", "experiments", "cli", "data", "sampling")}


# ----------------------------------------------------------------------------- registries

def test_registries_agree_with_the_names():
    from loopmdm.data.corpus import DETOKENIZERS
    from loopmdm.diffusion.schedule import SCHEDULES
    from loopmdm.model.blocks import BLOCKS
    from loopmdm.tasks import Task

    assert set(BLOCKS) == set(names.BLOCK_STYLES)
    assert set(SCHEDULES) == set(names.SCHEDULES)
    assert set(DETOKENIZERS) == set(names.DETOKENIZERS)
    for name in names.TASKS:
        task = names.lookup(names.TASKS, name, "task")
        assert isinstance(task, Task) and task.name == name
    for name in names.SAMPLERS:
        assert names.lookup(names.SAMPLERS, name, "sampler").name == name


# A toy task in a file of its own: copy the prompt (four symbols) into the answer slots.
TOY_TASK = '''
import numpy as np

from loopmdm.tasks import Scoring, Task


def examples(size, hops, count, seed):
    prompt = np.random.default_rng(seed).integers(0, size, (count, 4))
    return np.concatenate([prompt, prompt], axis=1)


def test_set(data, rows, picked, seed, answer_len):
    x = rows.copy()
    x[:, 4:] = data.vocab_size
    return {"task": "copy", "x": x, "target": rows, "difficulty": np.full(len(rows), -1)}


def score(test, filled, mask_id):
    blank = test["x"] == mask_id
    return {"copied": float(((filled == test["target"]) & blank).sum() / blank.sum()), "n": len(filled)}


TASK = Task(name="copy", description="copy four symbols", symbols=lambda size, hops: [f"s{i}" for i in range(size)],
            seq_len=lambda size, hops: 8, prompt_len=lambda size, hops: 4, examples=examples,
            check=lambda size, hops: None,
            scoring=Scoring(test_set=test_set, score=score, describe=lambda r: f"copied {r['copied']:.3f}",
                            headline=("copied", "symbols copied"),
                            answer_symbols=lambda meta: int(meta["task_size"])))
'''

# A toy sampler in a file of its own: greedy, everything in one call.
TOY_SAMPLER = '''
from loopmdm.sampling.samplers import Sampler


def run(x, call, ts, steps, mask_id, temperature, generator, schedule):
    masked = x == mask_id
    logits = call(x, call.loops_at(0, float(ts[0])), float(ts[0]))
    x[masked] = logits[masked].argmax(-1)
    call.stepped(0, x)


GREEDY = Sampler("greedy", run, needs_schedule=False)
'''


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """Two new files on the path and one registry line each."""
    (tmp_path / "toy_copy_task.py").write_text(TOY_TASK)
    (tmp_path / "toy_greedy_sampler.py").write_text(TOY_SAMPLER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(names.TASKS, "copy", "toy_copy_task:TASK")
    monkeypatch.setitem(names.SAMPLERS, "greedy", "toy_greedy_sampler:GREEDY")
    yield
    for mod in ("toy_copy_task", "toy_greedy_sampler"):
        sys.modules.pop(mod, None)


def test_a_new_task_is_one_file_and_one_registry_line(plugins, tmp_path):
    from loopmdm.data.prepare import prepare_data
    from loopmdm.evaluation.solve import scoring_of, solve_task, task_test_set

    cfg = load_config(None, ["data.source=task", "data.task=copy", "data.task_size=10", "data.task_examples=200",
                             f"data.cache_dir={tmp_path / 'cache'}"])
    assert (cfg.data.seq_len, cfg.data.tokenizer) == (8, "task")  # resolved from the task
    data = prepare_data(cfg.data)
    test = task_test_set(data, 16)

    class Oracle(torch.nn.Module):  # predicts the target, whatever the input
        is_looped = False

        def forward(self, x, num_loops=1, t=None):
            target = torch.as_tensor(test["target"][: len(x)])
            return torch.nn.functional.one_hot(target, data.vocab_size).float() * 10

    records = solve_task(Oracle(), data, test, [1], "oneshot", "cpu", batch_size=len(test["x"]))
    assert records[0]["copied"] == 1.0
    assert scoring_of("copy").describe(records[0]) == "copied 1.000"
    with pytest.raises(LoopMDMError, match="task 'nosuch' is not allowed; choose one of: .*copy"):
        load_config(None, ["data.source=task", "data.task=nosuch"])


def test_a_new_sampler_is_one_file_and_one_registry_line(plugins, capsys):
    from loopmdm.cli import build_parser
    from loopmdm.sampling.samplers import sample

    assert load_config("tiny", ["sample.sampler=greedy"]).sample.sampler == "greedy"
    logits = torch.zeros(2, 6, 5)
    logits[..., 3] = 1.0
    out = sample(lambda x, loops, t: logits, mask_id=5, seq_len=6, batch_size=2, steps=4, loops=1, sampler="greedy")
    assert out.nfe == 1 and (out.tokens == 3).all()
    build_parser().parse_args(["sample", "RUN", "--sampler", "greedy"])  # the CLI reads the registry
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sample", "RUN", "--sampler", "nosuch"])
    assert "greedy" in capsys.readouterr().err
