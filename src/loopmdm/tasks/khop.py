"""k-hop pointer chasing: a depth probe beyond the paper.

The prompt lists the N edges of a random cycle over N nodes in random order, each edge one
token "a>b", then a start node s; the K answer slots hold f(s), f(f(s)), ..., f^K(s).

Why one token per edge: hop j then takes exactly j look-ups, each one attention step (the
slot holding node c attends to the edge token whose source is c and reads its target), so
under one-shot decoding (every answer slot from one denoiser call) hop j needs ~j + 1 rounds
of attention by chasing the chain. That is an upper bound, not a lower one: edge tokens can
compose with each other (a>b reads b>c and becomes a>>c), doubling the reach every layer, so
~log2(j) + 1 rounds suffice (pointer doubling; k-hop in O(log k) depth, Sanford, Hsu and
Telgarsky 2024, arXiv 2402.09268), and an edge token can read its predecessor edge as well as
its successor, so one layer widens what a token knows to a window of 4 nodes. Two layers
reach hop 3 at most (the edge whose predecessor is s holds f^3(s) for the slot to read, and
the edge whose successor is s holds f^-3(s)); 4 layers learned hop 4 on 8 nodes. A loop can
keep going either way. With (src, dst) as two
tokens each look-up first needs an induction-style pairing of neighbours, which a small model
did not learn in a CPU budget at all (docs/RESULTS.md, k-hop calibration). A single cycle
makes the K answers distinct (K < N), so no hop can be read off a short cycle.

Why hops <= N // 2: on one N-cycle f^(N-k)(s) = f^(-k)(s), so hop N - k is k look-ups
*backwards* (the slot attends to the edge token whose target is c and reads its source).
Beyond N // 2 hops the deepest answers need fewer rounds, not more (8 nodes / 6 hops needs at
most 4); with K <= N // 2 every hop j is j steps away in either direction, never fewer. But
hop N / 2 (N even) is the one node left once f^-(N/2-1)..f^(N/2-1) are known, so it can be
answered by elimination with a look-up fewer each way: a 2-layer MDM (reach 3 each way) did so
on 8 nodes / 4 hops (docs/RESULTS.md, khop cpu-shallow, seed 2: 0.46 on hop 4). A probe of
depth at hop K therefore wants N > 2K (`khop --scale cpu-shallow10`: 10 nodes, 4 hops, 3
candidates left, so elimination guesses a third; 16 nodes learned nothing at the sweep's 8e12
FLOPs); K = N / 2 stays allowed for the committed 8-node suites.

Sequence: [e_1 ... e_N  s  a_1 ... a_K]. Token ids: node i = i (0..N-1); edge a>b = N + a*N + b.
Only the K answer slots are ever masked (the prompt is always given: meta `prompt_len`).
"""

from __future__ import annotations

import numpy as np

from loopmdm.errors import require
from loopmdm.tasks import PerS, Scoring, Task


def check(n_nodes: int, hops: int) -> None:
    require(3 <= n_nodes <= 64, f"data.task_size={n_nodes} khop nodes must be in [3, 64] (the vocabulary holds nodes^2 edge tokens)")
    require(1 <= hops <= n_nodes // 2,
            f"data.task_hops={hops} with data.task_size={n_nodes} khop nodes is not allowed: hops must be in "
            f"[1, {n_nodes // 2}] (task_size // 2), since on one cycle hop N - k is k look-ups backwards")


def symbols(n_nodes: int) -> list[str]:
    """Token strings, id = index: the nodes, then every edge a>b."""
    return [f"n{i}" for i in range(n_nodes)] + [f"{a}>{b}" for a in range(n_nodes) for b in range(n_nodes)]


def seq_len(n_nodes: int, hops: int) -> int:
    return n_nodes + 1 + hops


def prompt_len(n_nodes: int) -> int:
    return n_nodes + 1


def random_examples(n_nodes: int, hops: int, count: int, seed: int) -> np.ndarray:
    """(count, seq_len) int64 sequences, vectorised."""
    check(n_nodes, hops)
    rng = np.random.default_rng(seed)
    N = n_nodes
    order = np.argsort(rng.random((count, N)), axis=1)  # a random cycle: order[0] -> order[1] -> ...
    succ = np.empty_like(order)
    rows = np.arange(count)[:, None]
    succ[rows, order] = np.roll(order, -1, axis=1)  # succ[node] = next node on the cycle
    src = np.argsort(rng.random((count, N)), axis=1)  # edges listed in random order
    edges = N + src * N + np.take_along_axis(succ, src, axis=1)
    start = rng.integers(0, N, count)
    answers = np.empty((count, hops), dtype=np.int64)
    node = start
    for j in range(hops):
        node = succ[np.arange(count), node]
        answers[:, j] = node
    return np.concatenate([edges, start[:, None], answers], axis=1).astype(np.int64)


def answers_from_prompt(prompt: np.ndarray, n_nodes: int, hops: int) -> np.ndarray:
    """Reference solver: follow the edges listed in the prompt (for checking generated data)."""
    prompt = np.asarray(prompt)
    edges = prompt[:n_nodes] - n_nodes
    succ = {int(e) // n_nodes: int(e) % n_nodes for e in edges}
    node, out = int(prompt[n_nodes]), []
    for _ in range(hops):
        node = succ[node]
        out.append(node)
    return np.array(out)


# --------------------------------------------------------------------------- the task spec

def test_set(data, rows: np.ndarray, picked: np.ndarray, seed: int, answer_len: int) -> dict:
    """The validation rows with their answer slots blank."""
    x = rows.copy()
    x[:, int(data.meta["answer_start"]):] = data.vocab_size
    return {"task": "khop", "x": x, "target": rows, "difficulty": np.full(len(rows), -1)}


def score(test: dict, filled: np.ndarray, mask_id: int) -> dict:
    """Answer accuracy, per hop, and all hops right."""
    x, target = test["x"], test["target"]
    blank = x == mask_id
    correct = (filled == target) & blank
    per_hop = correct[:, blank[0]].mean(0)
    return {"acc": float(correct.sum() / blank.sum()), "per_hop": [float(a) for a in per_hop],
            "all_hops": float(correct[:, blank[0]].all(1).mean()), "n": len(x)}


def describe(r: dict) -> str:
    hops = " ".join(f"{a:.3f}" for a in r["per_hop"])
    return f"accuracy {r['acc']:.3f}  all hops {r['all_hops']:.3f}  per hop: {hops}"


TASK = Task(
    name="khop",
    description="k-hop pointer chasing on a random cycle of `size` nodes (one token per edge), `hops` answer slots",
    symbols=lambda size, hops: symbols(size),
    seq_len=seq_len,
    prompt_len=lambda size, hops: prompt_len(size),
    examples=random_examples,
    check=check,
    scoring=Scoring(
        test_set=test_set, score=score, describe=describe, headline=("acc", "answer accuracy"),
        tables=lambda record: tuple(PerS(f"hop{h + 1}", f"accuracy at hop {h + 1}", lambda r, h=h: r["per_hop"][h])
                                    for h in range(len(record["per_hop"]))),
        answer_symbols=lambda meta: int(meta["task_size"])),
)
