"""Retrofit (ours): a trained MDM becomes a LoopMDM whose loop block is its own layers."""


import pytest
import torch

from loopmdm.config import ModelConfig
from loopmdm.model.denoiser import LoopedDenoiser, restack_layers
from loopmdm.runs import load_run
from loopmdm.training.run import train


def _model(**loop):
    torch.manual_seed(0)
    model = LoopedDenoiser(ModelConfig(vocab_size=20, n_layers=4, d_model=16, n_heads=2, cond_dim=8, **loop))
    with torch.no_grad():  # adaLN and the head start at zero: every logit would be 0
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def test_restacked_mdm_at_one_loop_is_the_mdm_and_loops_its_own_layer():
    mdm, loop = _model(loop_start=None, loop_end=None), _model(loop_start=1, loop_end=3, max_train_loops=4)
    loop.load_state_dict(restack_layers(mdm.state_dict(), mdm.cfg, loop.cfg))
    mine, theirs = loop.state_dict(), mdm.state_dict()
    for name in (k.partition(".")[2].partition(".")[2] for k in theirs if k.startswith("prelude.0.")):
        assert torch.equal(mine[f"loop_block.1.{name}"], theirs[f"prelude.2.{name}"])  # layer 2, renamed
        assert torch.equal(mine[f"coda.0.{name}"], theirs[f"prelude.3.{name}"])
    x, t = torch.randint(0, 20, (2, 12)), torch.rand(2)
    with torch.no_grad():
        assert mdm(x, 1, t).abs().mean() > 0.1
        assert torch.allclose(loop(x, 1, t), mdm(x, 1, t), atol=1e-5)  # S = 1: the same 4-layer stack
        assert not torch.allclose(loop(x, 2, t), mdm(x, 1, t), atol=1e-3)  # S = 2 repeats layers 1-2
    back = restack_layers(loop.state_dict(), loop.cfg, mdm.cfg)
    assert set(back) == set(mdm.state_dict()) and all(torch.equal(back[k], v) for k, v in mdm.state_dict().items())


def test_init_from_an_mdm_run_retrofits_its_layers_into_the_loop(tiny_cfg_factory, tmp_path):
    mdm_dir = tmp_path / "mdm"
    train(tiny_cfg_factory("model.loop_start=null", "model.loop_end=null", "train.max_steps=2",
                           f"train.out_dir={mdm_dir}"))
    source = load_run(mdm_dir, device="cpu")
    loop_dir = tmp_path / "loop"
    cfg = tiny_cfg_factory("model.loop_start=1", "model.loop_end=2", f"train.init_from={mdm_dir}",
                           "train.max_steps=1", "train.lr=1e-12", "train.warmup_steps=0", f"train.out_dir={loop_dir}")
    train(cfg)
    loop = load_run(loop_dir, device="cpu")
    assert loop.model.is_looped and not source.model.is_looped
    x, t = torch.randint(0, source.model.vocab_size, (2, 16)), torch.full((2,), 0.5)
    with torch.no_grad():  # one step at lr 1e-12 moves nothing measurable: S = 1 is the MDM
        assert torch.allclose(loop.model(x, 1, t), source.model(x, 1, t), atol=1e-4)


def test_init_weights_best_starts_from_the_best_validation_weights(tiny_cfg_factory, tmp_path):
    from loopmdm.config import load_config
    from loopmdm.errors import LoopMDMError

    mdm_dir = tmp_path / "mdm"
    train(tiny_cfg_factory("model.loop_start=null", "model.loop_end=null", "train.max_steps=4", "train.eval_every=2",
                           "train.lr=3e-2", f"train.out_dir={mdm_dir}"))
    best, latest = load_run(mdm_dir, device="cpu", best=True), load_run(mdm_dir, device="cpu")
    x, t = torch.randint(0, best.model.vocab_size, (2, 16)), torch.full((2,), 0.5)
    loop_dir = tmp_path / "loop"
    train(tiny_cfg_factory("model.loop_start=1", "model.loop_end=2", f"train.init_from={mdm_dir}",
                           "train.init_weights=best", "train.max_steps=1", "train.lr=1e-12", "train.warmup_steps=0",
                           f"train.out_dir={loop_dir}"))
    loop = load_run(loop_dir, device="cpu")
    with torch.no_grad():
        assert torch.allclose(loop.model(x, 1, t), best.model(x, 1, t), atol=1e-4)
        if best.step != latest.step:  # the fixture's best is not its last: the two must differ
            assert not torch.allclose(loop.model(x, 1, t), latest.model(x, 1, t), atol=1e-4)
    with pytest.raises(LoopMDMError, match="train.init_weights='first'"):
        load_config(None, ["train.init_weights=first"])
