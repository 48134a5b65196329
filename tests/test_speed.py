"""Speed options applied from outside the model (training/speed.py, devices.py): per-block
torch.compile does not recompile when S changes between steps, per-iteration activation
checkpointing gives the same gradients and flat activation memory in S, TF32 only on CUDA.

The compile tests use dynamo with the `aot_eager` backend: graph capture, guards and
recompilation are dynamo's and the same for every backend; inductor's code generation
would add about a minute of C++ compilation per test on 2 CPU cores
(benchmarks/throughput.py measures the inductor-compiled model)."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from loopmdm.config import ModelConfig
from loopmdm.devices import configure_matmul_precision
from loopmdm.diffusion.objective import diffusion_loss
from loopmdm.diffusion.schedule import make_schedule
from loopmdm.model.denoiser import LoopedDenoiser
from loopmdm.training.speed import compile_blocks, is_compiled

V = 37


def tiny_model(**kw) -> LoopedDenoiser:
    base = dict(vocab_size=V, n_layers=4, d_model=32, n_heads=4, cond_dim=16, loop_start=1, loop_end=3,
                max_train_loops=5)
    base.update(kw)
    torch.manual_seed(0)
    model = LoopedDenoiser(ModelConfig(**base))
    with torch.no_grad():  # leave adaLN-Zero's identity start, so gradients reach every weight
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.train()


def train_steps(model: LoopedDenoiser, loops: list[int], after_step=None) -> list[dict]:
    """Training steps (NELBO, backward, AdamW) at the given S; returns each step's gradients."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = make_schedule("loglinear")
    x0 = torch.randint(0, V, (4, 16), generator=torch.Generator().manual_seed(1))
    grads = []
    for step, num_loops in enumerate(loops):
        torch.manual_seed(step)  # dropout draws
        out = diffusion_loss(model, x0, schedule, num_loops=num_loops, eps=1e-3,
                             generator=torch.Generator().manual_seed(step))
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step:
            after_step(step)
    return grads


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_compiled_blocks_do_not_recompile_when_s_changes(fresh_dynamo):
    """S = 1, 3, 5, 2: every graph is captured in the first step; later steps at other S
    reuse them (the loop is eager Python, S never enters a graph), and nothing breaks a graph."""
    model = tiny_model()
    assert compile_blocks(model, backend="aot_eager") == 4
    graphs = []
    train_steps(model, [1, 3, 5, 2], after_step=lambda _: graphs.append(counters["stats"]["unique_graphs"]))
    assert graphs[0] > 0, "the blocks were not compiled"
    assert graphs == [graphs[0]] * 4, f"graphs captured after each step: {graphs}"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert not counters["recompiles"], dict(counters["recompiles"])


def test_compiled_blocks_match_eager_with_and_without_checkpointing(fresh_dynamo):
    eager = train_steps(tiny_model(), [3, 2])
    for checkpoint_loops in (False, True):
        torch._dynamo.reset()
        model = tiny_model(checkpoint_loops=checkpoint_loops)
        compile_blocks(model, backend="aot_eager")
        for step_grads, eager_grads in zip(train_steps(model, [3, 2]), eager):
            assert step_grads.keys() == eager_grads.keys()
            for name in eager_grads:
                torch.testing.assert_close(step_grads[name], eager_grads[name], msg=name)


def test_checkpointing_reproduces_gradients_with_dropout():
    """Recomputation replays the forward's dropout masks (non-reentrant checkpoint keeps the
    RNG state), so gradients equal the plain run's, at S drawn anew each step."""
    plain = train_steps(tiny_model(dropout=0.2), [4, 1, 3])
    ckpt = train_steps(tiny_model(dropout=0.2, checkpoint_loops=True), [4, 1, 3])
    for a, b in zip(plain, ckpt):
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], msg=name)


def training_memory(model: LoopedDenoiser, num_loops: int) -> tuple[int, int]:
    """(bytes held for backward after the forward, peak bytes over forward + backward) of one
    training pass, from torch's MemTracker (every tensor storage, parameters and input included)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    x = torch.randint(0, V, (2, 32), generator=torch.Generator().manual_seed(0))
    tracker = MemTracker()
    tracker.track_external(model, x)
    cpu = torch.device("cpu")
    with tracker:
        loss = model(x, num_loops=num_loops).float().square().mean()
        held = tracker.get_tracker_snapshot("current")[cpu]["Total"]
        loss.backward()
    model.zero_grad(set_to_none=True)
    return held, tracker.get_tracker_snapshot("peak")[cpu]["Total"]


def test_checkpointing_keeps_activation_memory_nearly_flat_in_s():
    """Without checkpointing every iteration keeps its activations for backward (memory grows
    ~linearly in S); with it an iteration keeps only its output H^k (the next one's input)."""
    held, peak = {}, {}
    for checkpoint_loops in (False, True):
        model = tiny_model(checkpoint_loops=checkpoint_loops)
        (held1, peak1), (held6, peak6) = training_memory(model, 1), training_memory(model, 6)
        held[checkpoint_loops], peak[checkpoint_loops] = held6 - held1, peak6 - peak1
    hidden_state = 2 * 32 * 32 * 4  # one (B, L, d) float32 H^k
    assert held[False] > 5 * 20 * hidden_state
    assert held[True] <= 5 * 1.5 * hidden_state  # 5 extra iterations, one H^k each
    # The backward peak also grows by ~2 H^k per iteration in both modes (engine buffers).
    assert peak[True] < 0.25 * peak[False]


def test_compile_is_in_place_and_survives_deepcopy():
    """Compiled blocks keep their state-dict keys, and an EMA deepcopy computes with its own weights."""
    model = tiny_model()
    keys = list(model.state_dict())
    compile_blocks(model, backend="eager")
    assert is_compiled(model) and list(model.state_dict()) == keys
    assert compile_blocks(model, backend="eager") == 0  # idempotent
    twin = copy.deepcopy(model)
    for block, twin_block in zip(model.loop_block, twin.loop_block):
        assert twin_block.forward.__self__ is twin_block and block.forward.__self__ is block


def test_tf32_only_on_cuda_and_not_for_explicit_fp32():
    before = torch.get_float32_matmul_precision()
    try:
        assert not configure_matmul_precision(torch.device("cpu"), "bf16")
        assert not configure_matmul_precision(torch.device("cuda"), "fp32")
        assert torch.get_float32_matmul_precision() == before
        assert configure_matmul_precision(torch.device("cuda"), "auto")
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_attention_uses_sdpa(monkeypatch):
    """Attention goes through F.scaled_dot_product_attention (flash / memory-efficient kernels
    on CUDA under bf16), never the explicit softmax, unless an analysis probe asks for it."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    model = tiny_model()
    model(torch.randint(0, V, (2, 8)), num_loops=3)
    assert len(calls) == 4 + 2 * 2  # every block pass: 4 layers + 2 extra iterations of 2


def test_trainer_applies_train_compile(tiny_cfg_factory):
    from loopmdm.data.prepare import prepare_data
    from loopmdm.training.trainer import Trainer

    cfg = tiny_cfg_factory("train.compile=true")
    data = prepare_data(cfg.data)
    cfg.model.vocab_size = data.vocab_size
    trainer = Trainer(cfg, data, cfg.train.out_dir)
    assert trainer.speedups == {"tf32": False, "compiled_blocks": 3, "checkpoint_loops": False}
    assert is_compiled(trainer.model)
