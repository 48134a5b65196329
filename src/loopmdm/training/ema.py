"""Exponential moving average of the weights (MDLM: 0.9999), used for evaluation and sampling."""

from __future__ import annotations

import torch
import torch.nn as nn

from loopmdm.training.distributed import full_tensor, shard_like


class EMA:
    """shadow <- d * shadow + (1 - d) * weights, with d = min(decay, (1 + n) / (10 + n)) after
    n updates. The warm-up (as in timm / TF's num_updates) keeps a short run's EMA from being
    mostly the random initialisation; after ~10 / (1 - decay) updates it is plain EMA.

    Under FSDP the shadow copies are DTensors sharded like the parameters (the update is
    local to each rank's shard, no communication); `full_state_dict` gathers them."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()
                       if v.dtype.is_floating_point}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        state = model.state_dict()
        keys = list(self.shadow)
        # One fused multi-tensor kernel instead of one per parameter (matters on GPU).
        torch._foreach_lerp_([self.shadow[k] for k in keys], [state[k].detach().float() for k in keys], 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Whole tensors (all-gathered under FSDP: every rank must call it)."""
        return {k: full_tensor(v) for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        """Load full tensors (a checkpoint); under FSDP each rank keeps its shard."""
        self.num_updates = num_updates
        for k in self.shadow:
            self.shadow[k].copy_(shard_like(state[k], self.shadow[k]))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's weights with the EMA weights."""
        state = model.state_dict()
        for k, v in self.shadow.items():
            state[k].copy_(v.to(state[k].dtype))
