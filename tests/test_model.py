"""The looped denoiser: S = 1 is the plain model, S loops equal the layers repeated by hand,
and the ablation switches do what they say."""

import copy

import pytest
import torch

from loopmdm.config import ModelConfig
from loopmdm.errors import LoopMDMError
from loopmdm.model.denoiser import LoopedDenoiser

V = 37


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=V, n_layers=5, d_model=32, n_heads=4, cond_dim=16, loop_start=1, loop_end=3,
                max_train_loops=4)
    base.update(kw)
    return ModelConfig(**base)


def randomised(model: LoopedDenoiser, seed: int = 0) -> LoopedDenoiser:
    """DiT blocks start as the identity (zero adaLN); perturb every weight so tests can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def unrolled_copy(looped: LoopedDenoiser, num_loops: int) -> LoopedDenoiser:
    """A plain (unlooped) model whose layers are [prelude, loop_block x S, coda], copied by hand."""
    cfg = looped.cfg
    depth = cfg.n_layers + (num_loops - 1) * cfg.n_loop_layers
    plain = LoopedDenoiser(tiny_cfg(block=cfg.block, n_layers=depth, loop_start=None, loop_end=None,
                                    time_conditioning=cfg.time_conditioning))
    layers = list(looped.prelude) + list(looped.loop_block) * num_loops + list(looped.coda)
    for dst, src in zip(plain.prelude, layers):
        dst.load_state_dict(src.state_dict())
    plain.embed.load_state_dict(looped.embed.state_dict())
    plain.head.load_state_dict(looped.head.state_dict())
    if looped.time_embed is not None:
        plain.time_embed.load_state_dict(looped.time_embed.state_dict())
    return plain.eval()


@pytest.fixture(params=["dit", "llama"])
def block(request):
    return request.param


def test_blocks_start_as_identity_in_dit():
    """adaLN-Zero: a fresh DiT ignores its blocks, so all positions give the same zero logits."""
    torch.manual_seed(0)
    model = LoopedDenoiser(tiny_cfg()).eval()
    logits = model(torch.randint(0, V + 1, (2, 8)), num_loops=3)
    assert torch.count_nonzero(logits) == 0


def test_one_loop_equals_unlooped_model(block):
    torch.manual_seed(0)
    looped = randomised(LoopedDenoiser(tiny_cfg(block=block)))
    plain = unrolled_copy(looped, 1)
    x = torch.randint(0, V + 1, (3, 12))
    torch.testing.assert_close(looped(x, num_loops=1), plain(x), rtol=0, atol=0)


@pytest.mark.parametrize("num_loops", [2, 5])
def test_looped_equals_layers_repeated_by_hand(block, num_loops):
    torch.manual_seed(1)
    looped = randomised(LoopedDenoiser(tiny_cfg(block=block)), seed=1)
    plain = unrolled_copy(looped, num_loops)
    x = torch.randint(0, V + 1, (2, 10))
    out = looped(x, num_loops=num_loops)
    torch.testing.assert_close(out, plain(x), rtol=0, atol=0)
    # and more loops really change the output (the loop is not a no-op)
    assert not torch.allclose(out, looped(x, num_loops=1))


def test_loops_beyond_training_maximum_work():
    model = randomised(LoopedDenoiser(tiny_cfg(max_train_loops=2)))
    out = model(torch.randint(0, V, (1, 6)), num_loops=24)
    assert out.shape == (1, 6, V) and torch.isfinite(out).all()


def test_time_conditioning_changes_output_only_when_enabled():
    x = torch.randint(0, V + 1, (2, 8))
    agnostic = randomised(LoopedDenoiser(tiny_cfg(time_conditioning=False)))
    torch.testing.assert_close(agnostic(x, 2, t=torch.tensor([0.1, 0.9])), agnostic(x, 2, t=torch.tensor([0.5, 0.5])))
    conditioned = randomised(LoopedDenoiser(tiny_cfg(time_conditioning=True)))
    assert not torch.allclose(conditioned(x, 2, t=torch.tensor([0.1, 0.9])), conditioned(x, 2, t=torch.tensor([0.5, 0.5])))


def test_return_hidden_gives_every_loop_output():
    model = randomised(LoopedDenoiser(tiny_cfg()))
    x = torch.randint(0, V + 1, (2, 8))
    logits, hidden = model(x, num_loops=4, return_hidden=True)
    assert len(hidden) == 5  # H^0 (prelude output) .. H^4
    torch.testing.assert_close(model.run_coda(hidden[-1], model.condition(None, 2, x.device)), logits)
    for k in range(1, 5):
        torch.testing.assert_close(model.loop_step(hidden[k - 1], model.condition(None, 2, x.device)), hidden[k])


def test_unlooped_baseline_ignores_num_loops():
    model = randomised(LoopedDenoiser(tiny_cfg(loop_start=None, loop_end=None)))
    x = torch.randint(0, V + 1, (2, 8))
    assert not model.is_looped
    torch.testing.assert_close(model(x, num_loops=1), model(x, num_loops=7))


def test_mask_token_is_input_only():
    model = LoopedDenoiser(tiny_cfg())
    assert model.mask_id == V
    assert model.embed.num_embeddings == V + 1
    assert model.head.linear.out_features == V


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "3"])
def test_bad_num_loops_is_a_clear_error(bad):
    model = LoopedDenoiser(tiny_cfg())
    with pytest.raises(LoopMDMError, match="num_loops"):
        model(torch.zeros(1, 4, dtype=torch.long), num_loops=bad)


def test_bad_loop_range_is_a_clear_error():
    with pytest.raises(LoopMDMError, match=r"loop range \[2, 9\)"):
        LoopedDenoiser(tiny_cfg(loop_start=2, loop_end=9))


def test_input_injection_keeps_one_loop_exact():
    base = randomised(LoopedDenoiser(tiny_cfg()))
    injected = LoopedDenoiser(tiny_cfg(input_injection=True)).eval()
    injected.load_state_dict(base.state_dict())
    x = torch.randint(0, V + 1, (2, 8))
    torch.testing.assert_close(base(x, 1), injected(x, 1))
    assert not torch.allclose(base(x, 3), injected(x, 3))


def test_truncated_gradients_only_flow_through_last_iterations():
    torch.manual_seed(0)
    model = randomised(LoopedDenoiser(tiny_cfg(grad_loops=2))).train()
    x = torch.randint(0, V + 1, (2, 8))
    model(x, num_loops=5).square().mean().backward()
    # Early iterations run without a graph, so nothing reaches the prelude (no injection).
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.prelude.parameters())
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in model.loop_block.parameters())
    full = LoopedDenoiser(tiny_cfg()).eval()
    full.load_state_dict(model.state_dict())
    torch.testing.assert_close(model.eval()(x, 5), full(x, 5))  # forward value unchanged


def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = randomised(LoopedDenoiser(tiny_cfg())).train()
    ckpt = copy.deepcopy(plain)
    ckpt.cfg = tiny_cfg(checkpoint_loops=True)
    x = torch.randint(0, V + 1, (2, 8))
    plain(x, num_loops=3).square().mean().backward()
    ckpt(x, num_loops=3).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_padding_keys_do_not_affect_valid_positions(block):
    model = randomised(LoopedDenoiser(tiny_cfg(block=block)))
    x = torch.randint(0, V, (1, 10))
    key_mask = torch.ones(1, 10, dtype=torch.bool)
    key_mask[:, 7:] = False
    y = x.clone()
    y[:, 7:] = (x[:, 7:] + 5) % V  # change only the padded positions
    torch.testing.assert_close(model(x, 2, key_mask=key_mask)[:, :7], model(y, 2, key_mask=key_mask)[:, :7])


@pytest.mark.parametrize("variant", [{}, {"input_injection": True}, {"grad_loops": 2}, {"checkpoint_loops": True}])
def test_loop_driver_reproduces_forward_iteration_by_iteration(variant):
    """`iterate_loop` is the one loop: driving it by hand gives forward()'s hidden states at every
    k and the same logits and gradients, with injection, truncated gradients or checkpointing."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=23, n_layers=4, d_model=32, n_heads=2, cond_dim=8, loop_start=1, loop_end=3, **variant)
    model = LoopedDenoiser(cfg).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randint(0, 24, (2, 9))
    logits, hidden = model(x, num_loops=4, return_hidden=True)
    logits.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    c = model.condition(None, 2, x.device)
    h0 = model.run_prelude(x, c)
    states = list(model.iterate_loop(h0, c, None, 4))
    assert len(states) == 4
    for k, h in enumerate(states, start=1):
        torch.testing.assert_close(h, hidden[k])
    manual = model.run_coda(states[-1], c)
    torch.testing.assert_close(manual, logits)
    manual.square().mean().backward()
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], msg=name)
        else:
            assert p.grad is None or not p.grad.any(), name
    # open-ended driving (adaptive halting): the caller stops; the states are the same
    with torch.no_grad():
        open_ended = model.iterate_loop(model.run_prelude(x, c), c)
        for k in range(1, 6):
            h = next(open_ended)
            if k <= 4:
                torch.testing.assert_close(h, hidden[k])
