"""Training speed-ups applied from outside the model code (torchtitan's separation).

- `compile_blocks`: torch.compile on each transformer block (per-block compile, as
  torchtitan), never on the whole model. The loop over S stays in eager Python
  (`LoopedDenoiser.iterate_loop`), so no compiled graph sees S: a step with another S
  reuses the same graphs, with no recompilation (tests/test_speed.py counts them).
- Per-iteration activation checkpointing is `model.checkpoint_loops`: an iteration exists
  only inside the loop driver, so that is where its boundary is checkpointed (non-reentrant
  torch.utils.checkpoint around one `loop_step`); it composes with compiled blocks (the
  checkpointed iteration calls them).
- TF32 for float32 matmuls on CUDA lives in devices.py (`configure_matmul_precision`).

Intended order per block when FSDP2 is added: checkpoint (per iteration, at call time) ->
compile (here, in place) -> fully_shard (the module's hooks, hence FSDP2's all-gathers,
stay outside the compiled function; see `compile_blocks`).
"""

from __future__ import annotations

import types

import torch

from loopmdm.config import TrainConfig
from loopmdm.devices import configure_matmul_precision
from loopmdm.model.denoiser import LoopedDenoiser


def model_blocks(model: LoopedDenoiser) -> list[torch.nn.Module]:
    """Every transformer block, in call order: prelude, loop_block, coda."""
    return [*model.prelude, *model.loop_block, *model.coda]


def compile_blocks(model: LoopedDenoiser, backend: str = "inductor", **compile_kwargs) -> int:
    """torch.compile every block's forward, in place; returns how many blocks were compiled.

    Each block class's `forward` is compiled once and bound to every instance as an
    instance attribute (`block.forward`). Dynamo lifts parameters to graph inputs, so the
    12 blocks of a DiT share one set of graphs. Compiling `forward` rather than wrapping the
    module (`torch.compile(block)`) or compiling `_call_impl` (`block.compile()`) keeps
    (a) state-dict keys unchanged (no `_orig_mod.`; checkpoints load either way), (b) a
    deepcopy correct (the EMA copy's blocks rebind to the copy: copy.deepcopy rebinds bound
    methods), and (c) forward hooks outside the compiled function (FSDP2's unshard hooks).
    Calling it twice compiles nothing new."""
    compiled_forward: dict[type, object] = {}
    count = 0
    for block in model_blocks(model):
        if "forward" in vars(block):  # already compiled
            continue
        cls = type(block)
        if cls not in compiled_forward:
            compiled_forward[cls] = torch.compile(cls.forward, backend=backend, **compile_kwargs)
        block.forward = types.MethodType(compiled_forward[cls], block)
        count += 1
    return count


def is_compiled(model: LoopedDenoiser) -> bool:
    return any("forward" in vars(block) for block in model_blocks(model))


def apply_speedups(model: LoopedDenoiser, tc: TrainConfig, device: torch.device) -> dict:
    """What train.* asks for, applied before data-parallel wrapping (the trainer calls this
    once): TF32 on CUDA unless train.precision=fp32, and train.compile's per-block compile.
    Returns what was switched on."""
    return {"tf32": configure_matmul_precision(device, tc.precision),
            "compiled_blocks": compile_blocks(model) if tc.compile else 0,
            "checkpoint_loops": model.cfg.checkpoint_loops}
