"""k-hop pointer chasing: a depth probe beyond the paper.

The prompt lists the N edges of a random cycle over N nodes as shuffled (src, dst) pairs,
then a start node s; the K answer slots hold f(s), f(f(s)), ..., f^K(s). Finding hop j from
the prompt alone takes j sequential look-ups, so under one-shot decoding (every answer slot
from one denoiser call) hop j needs ~j rounds of attention: a fixed-depth stack runs out,
a loop can keep going. A single cycle makes the K answers distinct (K < N), so no hop can be
read off a short cycle.

Sequence: [src_1 dst_1 ... src_N dst_N  s  a_1 ... a_K]; token id = node id. Only the K
answer slots are ever masked (the prompt is always given: meta `prompt_len`).
"""

from __future__ import annotations

import numpy as np

from loopmdm.errors import require


def check(n_nodes: int, hops: int) -> None:
    require(n_nodes >= 3, f"khop nodes={n_nodes} must be >= 3")
    require(1 <= hops < n_nodes, f"khop hops={hops} must be in [1, nodes={n_nodes})")


def seq_len(n_nodes: int, hops: int) -> int:
    return 2 * n_nodes + 1 + hops


def prompt_len(n_nodes: int) -> int:
    return 2 * n_nodes + 1


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
    dst = np.take_along_axis(succ, src, axis=1)
    edges = np.stack([src, dst], axis=2).reshape(count, 2 * N)
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
    edges = prompt[: 2 * n_nodes].reshape(n_nodes, 2)
    succ = dict((int(a), int(b)) for a, b in edges)
    node, out = int(prompt[2 * n_nodes]), []
    for _ in range(hops):
        node = succ[node]
        out.append(node)
    return np.array(out)
