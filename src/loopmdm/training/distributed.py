"""Data parallelism applied from outside the model and the trainer (torchtitan's separation).

`loopmdm train` under `torchrun --nproc_per_node N` runs one process per device. How the
model is spread over them is `train.parallel` (names.PARALLELISMS, the names config checks):

  ddp   DistributedDataParallel: every rank holds the whole model, optimizer state and EMA;
        gradients are all-reduced on the last micro-batch only (no_sync before).
  fsdp  FSDP2 (torch.distributed.fsdp.fully_shard): every block of the prelude, the
        loop_block and the coda is its own FSDP unit, then the root (embedding, time
        embedder, head). Parameters, gradients, AdamW state and the EMA are sharded (dim 0)
        over the ranks; a block's weights are all-gathered just before it runs.

Every rank draws the same loop count S from (seed, step) (training/loops.py), so no rank
waits at a different depth. Without torchrun it is the single-process context.

Checkpoints are world-size independent: the sharded state is gathered into full tensors on
rank 0 and written in the single-process format (checkpoint.py), and a full state
is sharded again on load, so a checkpoint moves freely between 1 process, DDP and FSDP.

Connecting never hangs: the rendezvous waits at most LOOPMDM_DIST_CONNECT_TIMEOUT seconds
(default 300) and then fails with one line; collectives time out after LOOPMDM_DIST_TIMEOUT
(default 1800, long enough for rank 0 writing a checkpoint while the others wait).
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel

from loopmdm.errors import LoopMDMError, require
from loopmdm.names import PARALLELISMS
CONNECT_TIMEOUT_ENV, COLLECTIVE_TIMEOUT_ENV = "LOOPMDM_DIST_CONNECT_TIMEOUT", "LOOPMDM_DIST_TIMEOUT"


def _is_dtensor(value) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded DTensor is all-gathered (a collective: every rank calls it)."""
    return value.full_tensor() if _is_dtensor(value) else value


def local_tensor(value: torch.Tensor) -> torch.Tensor:
    """This rank's part: its shard of a DTensor, or the tensor itself."""
    return value.to_local() if _is_dtensor(value) else value


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `like`: sharded the same way if `like` is a DTensor. Every rank
    holds `full` (it read the checkpoint), so each keeps its own shard, with no communication."""
    if not _is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


@dataclass
class DistContext:
    """Single-process defaults (no torchrun); DDPContext / FSDPContext below are the torchrun versions."""

    rank: int = 0
    world_size: int = 1
    shards_model = False  # FSDP: parameters, optimizer state and EMA are DTensor shards

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def no_sync(self, wrapped: torch.nn.Module):
        return nullcontext()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def barrier(self) -> None:
        pass

    def any(self, flag: bool) -> bool:
        """True if `flag` is set on any rank."""
        return flag

    # Full (unsharded, single-process format) states for checkpoints; only the main rank's
    # result is written. Under FSDP these are collectives: every rank must call them.
    def model_state(self, model: torch.nn.Module, to_all: bool = False) -> dict:
        """The full weights, on the main rank (`to_all`: on every rank)."""
        return model.state_dict()

    def optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict()

    def load_model_state(self, model: torch.nn.Module, state: dict) -> None:
        model.load_state_dict(state)

    def load_optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)


class DDPContext(DistContext):
    def __init__(self, rank: int, world_size: int, device: torch.device):
        super().__init__(rank=rank, world_size=world_size)
        self.device = device

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def no_sync(self, wrapped: torch.nn.Module):
        return wrapped.no_sync()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().clone()
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.SUM)
        return value / self.world_size

    def barrier(self) -> None:
        torch_dist.barrier()

    def any(self, flag: bool) -> bool:
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
        return bool(value.item())


def _fqns_in_optimizer_order(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order torch's Optimizer.state_dict() numbers them (0, 1, ...)."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


class FSDPContext(DDPContext):
    """FSDP2: fully_shard per block, then the root. The base class's collectives (mean, any,
    barrier) are reused; gradient sync is never skipped (see no_sync)."""

    shards_model = True

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import fully_shard

        # One FSDP unit per transformer block, so only one block's full weights exist at a time.
        # The loop block runs S times per forward: with reshard_after_forward=False the forward
        # all-gathers it once instead of S times (it is 1-2 layers, so keeping it whole costs
        # little memory); the backward still gathers it per call (benchmarks/fsdp_collectives.py).
        for block in model.prelude:
            fully_shard(block)
        for block in model.loop_block:
            fully_shard(block, reshard_after_forward=False)
        for block in model.coda:
            fully_shard(block)
        fully_shard(model)  # the root: embedding, time embedder, head; sets up the root hooks
        # The logits are a view (nn.Linear on (B, L, d)), which FSDP2 warns about because an in-place
        # op on them would skip its pre-backward hook. The losses (diffusion/objective.py,
        # evaluation/judge.py) only read them out of place, so the warning is noise here.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        return model

    def no_sync(self, wrapped: torch.nn.Module):
        # Gradients are reduce-scattered after every micro-batch (as torchtitan does), so
        # they stay sharded between micro-batches; skipping the sync would keep full ones.
        return nullcontext()

    def model_state(self, model: torch.nn.Module, to_all: bool = False) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Full tensors; with cpu_offload only on rank 0's CPU (the other ranks get {}).
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not to_all))

    def optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(model, optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return {}
        # torch.distributed.checkpoint keys the state by parameter name; the checkpoint keeps
        # torch's plain format (parameters numbered in param-group order), as 1 process writes it.
        number = {name: i for i, name in enumerate(_fqns_in_optimizer_order(model, optimizer))}
        return {"state": {number[name]: value for name, value in state["state"].items()},
                "param_groups": [{**group, "params": [number[name] for name in group["params"]]}
                                 for group in state["param_groups"]]}

    def load_model_state(self, model: torch.nn.Module, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # Every rank read the full checkpoint; each keeps its own shard (no broadcast needed).
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))

    def load_optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = _fqns_in_optimizer_order(model, optimizer)
        require(len(state["param_groups"]) == len(optimizer.param_groups)
                and sum(len(g["params"]) for g in state["param_groups"]) == len(names),
                f"the optimizer state has {sum(len(g['params']) for g in state['param_groups'])} parameters "
                f"in {len(state['param_groups'])} groups, this model {len(names)} in {len(optimizer.param_groups)}")
        by_name = {"state": {names[i]: value for i, value in state["state"].items()},
                   "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                    for group in state["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def _seconds_from_env(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    require(value > 0, f"{name}={raw!r} must be a number of seconds > 0")
    return value


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]


@contextmanager
def _native_stderr_held_back():
    """c10d's C++ socket code logs each failed connection attempt, with a native stack trace,
    straight to file descriptor 2. A failure becomes one LoopMDMError line instead, so hold that
    output back: dropped on failure, written out after all on success."""
    sys.stderr.flush()
    saved = os.dup(2)
    ok = False
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
            ok = True
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if ok:
                held.seek(0)
                os.write(2, held.read())


def connect(rank: int, world_size: int, backend: str) -> None:
    """init_process_group with a bounded wait: the store rendezvous (rank 0 hosts a TCPStore at
    MASTER_ADDR:MASTER_PORT, or torchrun's agent does) gives up after the connect timeout with
    one LoopMDMError line instead of waiting forever for a peer that cannot reach it."""
    connect_s = _seconds_from_env(CONNECT_TIMEOUT_ENV, 300.0)
    collective_s = _seconds_from_env(COLLECTIVE_TIMEOUT_ENV, 1800.0)
    where = f"MASTER_ADDR={os.environ.get('MASTER_ADDR', '?')} MASTER_PORT={os.environ.get('MASTER_PORT', '?')}"
    try:
        with _native_stderr_held_back():
            store, _, _ = next(torch_dist.rendezvous("env://", rank, world_size,
                                                     timeout=timedelta(seconds=connect_s)))
            # The rendezvous store is shared with torchrun's agent: prefix our keys, as init_process_group does.
            store = torch_dist.PrefixStore("default_pg", store)
            torch_dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size,
                                          timeout=timedelta(seconds=collective_s))
    except (RuntimeError, TimeoutError, OSError, ValueError) as exc:
        raise LoopMDMError(
            f"rank {rank} of {world_size} could not connect to the other training processes at {where} within "
            f"{connect_s:g} s ({type(exc).__name__}: {_first_line(exc)}); check that every rank was started, that "
            f"the address is reachable and the port free/open (firewall, network or loopback interface down), "
            f"or set {CONNECT_TIMEOUT_ENV}=SECONDS") from None


@contextmanager
def dist_context(device: str = "auto", parallel: str = "ddp"):
    """Yield a DDPContext / FSDPContext (train.parallel) under torchrun (WORLD_SIZE > 1), else
    the single-process context (FSDP on one process would shard nothing)."""
    require(parallel in PARALLELISMS, f"train.parallel='{parallel}' is not allowed; choose one of: {', '.join(PARALLELISMS)}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        yield DistContext()
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    connect(rank, world_size, "nccl" if use_cuda else "gloo")
    context = FSDPContext if parallel == "fsdp" else DDPContext
    try:
        yield context(rank, world_size, torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"))
    finally:
        torch_dist.destroy_process_group()
