"""Batches of packed blocks: an endless, resumable, rank-sharded training stream and an
in-order evaluation pass.

The training order is a pure function of (seed, epoch, cursor), so saving those two
integers in a checkpoint is enough to resume with exactly the same batches.
"""

from __future__ import annotations

from typing import Dict, Iterator, Optional

import numpy as np
import torch

from loopmdm.errors import require


def _to_tensor(rows: np.ndarray) -> torch.Tensor:
    # Always a copy: callers mask batches in place, which must never touch the blocks.
    return torch.from_numpy(np.array(rows, dtype=np.int64))


class BlockLoader:
    """Endless shuffled batches from `blocks` (n_blocks, seq_len) for one rank.

    Epoch e visits `default_rng([seed, e]).permutation(N)`. Each global step takes the
    next `batch_size * world_size` indices; rank r keeps its `batch_size` slice. The
    incomplete tail of an epoch is dropped, so all ranks always step together.
    """

    def __init__(self, blocks: np.ndarray, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        require(blocks.ndim == 2, f"blocks must have shape (n_blocks, seq_len), got {tuple(blocks.shape)}")
        require(batch_size > 0, f"batch_size={batch_size} must be > 0")
        require(world_size > 0 and 0 <= rank < world_size,
                f"rank={rank} must be in [0, world_size={world_size})")
        self.blocks = blocks
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.global_batch = batch_size * world_size
        require(len(blocks) >= self.global_batch,
                f"only {len(blocks)} blocks for a global batch of {self.global_batch} "
                f"(batch_size={batch_size} x world_size={world_size}); use a smaller batch or more data")
        self.epoch = 0
        self.cursor = 0  # index into the epoch's permutation of the next global step
        self._perm: Optional[np.ndarray] = None
        self._perm_epoch = -1

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:  # cache: one permutation per epoch
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.blocks))
            self._perm_epoch = self.epoch
        return self._perm

    def next_batch(self) -> torch.Tensor:
        """LongTensor (batch_size, seq_len) of this rank's rows for the next global step."""
        if self.cursor + self.global_batch > len(self.blocks):
            self.epoch += 1
            self.cursor = 0
        start = self.cursor + self.rank * self.batch_size
        indices = self._permutation()[start:start + self.batch_size]
        self.cursor += self.global_batch
        return _to_tensor(self.blocks[indices])

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    @property
    def steps_per_epoch(self) -> int:
        return len(self.blocks) // self.global_batch

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        require(isinstance(state, dict) and "epoch" in state and "cursor" in state,
                f"loader state {state!r} must be a dict with 'epoch' and 'cursor'")
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        require(epoch >= 0 and 0 <= cursor <= len(self.blocks),
                f"loader state epoch={epoch}, cursor={cursor} does not fit {len(self.blocks)} blocks")
        self.epoch, self.cursor = epoch, cursor


def eval_rows(n_blocks: int, batch_size: int, num_batches: int = 0) -> np.ndarray:
    """Which rows an evaluation reads: all of them, or — when num_batches limits it — rows
    spread evenly over the split. Splits are stored in document order (e.g. the embedded
    validation split starts with Shakespeare), so the first rows would be a biased sample."""
    wanted = num_batches * batch_size
    if num_batches == 0 or wanted >= n_blocks:
        return np.arange(n_blocks)
    return np.unique(np.linspace(0, n_blocks - 1, wanted).round().astype(np.int64))


def iter_eval_batches(blocks: np.ndarray, batch_size: int, num_batches: int = 0) -> Iterator[torch.Tensor]:
    """Unshuffled batches of `eval_rows` (the whole split when num_batches = 0), last partial batch kept."""
    require(batch_size > 0, f"batch_size={batch_size} must be > 0")
    require(num_batches >= 0, f"num_batches={num_batches} must be >= 0")
    rows = eval_rows(len(blocks), batch_size, num_batches)
    for start in range(0, len(rows), batch_size):
        yield _to_tensor(blocks[rows[start:start + batch_size]])
