"""main_fp16_optimizer.py's FP16OptimizerRecipe: the recipe interface around FP16_Optimizer."""
import math

import pytest
import torch

import main_fp16_optimizer
import training
from conftest import BSZ, batch, tiny_model


def step(model, recipe, seed=3):
    return training.train_batch(model, recipe, *batch(seed), model.init_hidden(BSZ))


@pytest.mark.parametrize('dynamic, name, scale_text', [(False, 'fp16-optimizer-static', 'static loss scale 128'),
                                                       (True, 'fp16-optimizer-dynamic', 'dynamic loss scale')])
def test_names_and_description(dynamic, name, scale_text):
    model = tiny_model()
    r = main_fp16_optimizer.FP16OptimizerRecipe(model, lr=0.5, clip=0.25, static_loss_scale=128.0,
                                                dynamic_loss_scale=dynamic)
    assert all(p.dtype == torch.float16 for p in model.parameters())
    assert r.name == name
    assert r.describe() == f'fp16, FP16_Optimizer from {main_fp16_optimizer.FP16_OPTIMIZER_SOURCE}, {scale_text}'
    assert r.loss_scale == (2.0 ** 16 if dynamic else 128.0)  # apex's last dynamic default
    assert r.optimizer.param_groups[0]['lr'] == 0.5  # where the loop reads and anneals it
    with r.autocast():
        assert not torch.is_autocast_enabled('cpu')


def test_default_is_a_static_scale_of_one():
    r = main_fp16_optimizer.FP16OptimizerRecipe(tiny_model(), lr=0.5, clip=0.25)
    assert r.name == 'fp16-optimizer-static' and r.loss_scale == 1.0


def test_dynamic_scale_skips_overflowing_updates_and_halves(capsys):
    model = tiny_model()
    r = main_fp16_optimizer.FP16OptimizerRecipe(model, lr=0.5, clip=0.25, dynamic_loss_scale=True)
    assert step(model, r)[2] is True and r.loss_scale == 2.0 ** 16  # the default scale fits this model
    r.optimizer.loss_scale = 2.0 ** 32  # one that overflows fp16 gradients
    before = [p.detach().clone() for p in model.parameters()]
    loss, _, updated = step(model, r)
    assert updated is False and math.isfinite(loss.item())
    assert r.loss_scale == 2.0 ** 31
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())
    assert 'overflow' not in capsys.readouterr().out.lower()  # quiet: the loop reports skips
    # the scale keeps halving until fp16 gradients fit; then updates are made
    results = [step(model, r, seed)[2] for seed in range(40)]
    assert results[0] is False and results[-1] is True and r.loss_scale < 2.0 ** 31
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_static_step_updates_and_clips():
    model = tiny_model()
    r = main_fp16_optimizer.FP16OptimizerRecipe(model, lr=1.0, clip=1e-3, static_loss_scale=128.0)
    masters = [p.detach().clone() for p in r.optimizer.all_fp32_from_fp16_params]
    _, _, updated = step(model, r)
    assert updated is True and r.loss_scale == 128.0
    moved = torch.cat([(p.detach() - m).reshape(-1) for p, m in zip(r.optimizer.all_fp32_from_fp16_params, masters)])
    torch.testing.assert_close(moved.norm(), torch.tensor(1e-3), rtol=1e-3, atol=0)  # lr 1 * clipped norm
    for p, m in zip(model.parameters(), r.optimizer.all_fp32_from_fp16_params):
        assert torch.equal(p, m.detach().half())


def test_state_dict_round_trip_keeps_the_dynamic_scale():
    model = tiny_model()
    r = main_fp16_optimizer.FP16OptimizerRecipe(model, lr=0.5, clip=0.25, dynamic_loss_scale=True)
    r.optimizer.loss_scale = 2.0 ** 32
    assert step(model, r)[2] is False
    other_model = tiny_model(seed=1)
    other = main_fp16_optimizer.FP16OptimizerRecipe(other_model, lr=0.1, clip=0.25, dynamic_loss_scale=True)
    other.load_state_dict(r.state_dict())
    assert other.loss_scale == r.loss_scale == 2.0 ** 31
    assert all(torch.equal(a, b) for a, b in zip(other_model.parameters(), model.parameters()))
    # A static recipe adopts the saved dynamic scale, as apex's FP16_Optimizer did (--resume
    # refuses such a checkpoint before loading it: the recipe names differ).
    static = main_fp16_optimizer.FP16OptimizerRecipe(tiny_model(), lr=0.5, clip=0.25, static_loss_scale=128.0)
    static.load_state_dict(r.state_dict())
    assert static.optimizer.dynamic_loss_scale is True and static.loss_scale == 2.0 ** 31
    assert static.describe().endswith('dynamic loss scale')
