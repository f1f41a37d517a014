"""recipes.py: AutocastRecipe (fp32, --amp, --bf16) and from_flags; the fp16 recipes on a Transformer."""
import argparse
import math

import pytest
import torch

import recipes
import training
from main import ManualFP16Recipe
from main_fp16_optimizer import FP16OptimizerRecipe
from model import RNNModel, TransformerModel
from plumbing import errors


def recipe(model, mode='fp32', lr=1.0, clip=10.0):
    return recipes.AutocastRecipe(model, lr, clip, {'fp32': None, 'amp': torch.float16, 'bf16': torch.bfloat16}[mode])


def tiny_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(32, (5, 3), generator=g), torch.randint(32, (15,), generator=g)


def test_amp_step_on_cpu_skips_overflow_and_lowers_the_scale(capsys):
    """A skipped update: train_batch says so (its third value), the weights stay, the scale halves.
    The recipe neither counts nor prints the skip: that is the loop's job."""
    torch.manual_seed(0)
    model = RNNModel('LSTM', 32, 8, 8, 1, dropout=0.0)
    r = recipe(model, 'amp')
    inputs, targets = tiny_batch()
    before = [p.detach().clone() for p in model.parameters()]
    scale = r.loss_scale
    assert scale == 2.0 ** 16
    handle = model.decoder.weight.register_hook(lambda g: torch.full_like(g, math.inf))
    loss, hidden, updated = training.train_batch(model, r, inputs, targets, model.init_hidden(3))
    assert updated is False
    assert math.isfinite(loss.item()) and loss.requires_grad is False
    assert r.loss_scale == scale / 2
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
        assert p.grad is None
    assert capsys.readouterr().out == ''
    handle.remove()
    _, _, updated = training.train_batch(model, r, inputs, targets, hidden)
    assert updated is True and r.loss_scale == scale / 2
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_train_batch_returns_loss_hidden_and_update():
    torch.manual_seed(0)
    model = RNNModel('LSTM', 32, 8, 8, 1, dropout=0.0)
    r = recipe(model)
    inputs, targets = tiny_batch()
    hidden = model.init_hidden(3)
    loss, new_hidden, updated = training.train_batch(model, r, inputs, targets, hidden)
    assert updated is True
    assert loss.dim() == 0 and not loss.requires_grad
    assert loss.item() == pytest.approx(math.log(32), rel=0.1)  # about uniform at the start
    assert isinstance(new_hidden, tuple) and new_hidden[0].shape == (1, 3, 8)
    assert not torch.equal(new_hidden[0], hidden[0])


@pytest.mark.parametrize('mode, name, describe_text, scaled', [
    ('fp32', 'fp32', 'fp32', False),
    ('amp', 'amp', 'amp: autocast float16, fp32 weights, GradScaler (dynamic loss scale)', True),
    ('bf16', 'bf16', 'bf16: autocast bfloat16, fp32 weights, no loss scaling', False),
])
def test_recipe_names_and_from_flags(mode, name, describe_text, scaled):
    model = RNNModel('GRU', 32, 8, 8, 1, dropout=0.0)
    flags = argparse.Namespace(lr=3.0, clip=0.5, amp=mode == 'amp', bf16=mode == 'bf16', fp16=False, use_optimizer=False)
    r = recipes.from_flags(model, flags)
    assert r.name == name and r.describe() == describe_text
    assert r.optimizer.param_groups[0]['lr'] == 3.0 and r.clip == 0.5
    assert (r.loss_scale is not None) == scaled
    with r.autocast():
        assert torch.is_autocast_enabled('cpu') == (mode != 'fp32')
        if mode != 'fp32':
            assert torch.get_autocast_dtype('cpu') == {'amp': torch.float16, 'bf16': torch.bfloat16}[mode]


def test_amp_state_dict_restores_the_scale():
    """What --resume restores for --amp: the optimizer and GradScaler's scale."""
    torch.manual_seed(0)
    model = RNNModel('LSTM', 32, 8, 8, 1, dropout=0.0)
    r = recipe(model, 'amp', lr=0.5)
    handle = model.decoder.weight.register_hook(lambda g: torch.full_like(g, math.inf))
    training.train_batch(model, r, *tiny_batch(), model.init_hidden(3))
    handle.remove()
    other = recipe(RNNModel('LSTM', 32, 8, 8, 1, dropout=0.0), 'amp', lr=2.0)
    other.load_state_dict(r.state_dict())
    assert other.loss_scale == r.loss_scale == 2.0 ** 15
    assert other.optimizer.param_groups[0]['lr'] == 0.5


def test_amp_and_bf16_steps_follow_fp32():
    """One autocast step changes the weights like the fp32 step does, up to low-precision rounding."""
    inputs, targets = tiny_batch(1)
    updated = {}
    for mode in ('fp32', 'amp', 'bf16'):
        torch.manual_seed(0)
        model = RNNModel('GRU', 32, 8, 8, 1, dropout=0.0)
        r = recipe(model, mode)
        _, _, made = training.train_batch(model, r, inputs, targets, model.init_hidden(3))
        assert made is True
        assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 weights in every mode
        updated[mode] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.manual_seed(0)
    initial = torch.cat([p.detach().flatten() for p in RNNModel('GRU', 32, 8, 8, 1, dropout=0.0).parameters()])
    fp32_update = updated['fp32'] - initial
    assert fp32_update.abs().max() > 1e-3
    for mode, tol in (('amp', 1e-2), ('bf16', 5e-2)):
        relative_error = (updated[mode] - initial - fp32_update).norm() / fp32_update.norm()
        assert 0 < relative_error < tol, (mode, relative_error)


@pytest.mark.parametrize('mode', ['fp32', 'bf16'])
def test_unscaled_divergence_raises(mode):
    """Non-finite gradients with no loss scale to blame: training diverged, nothing updated."""
    torch.manual_seed(0)
    model = RNNModel('LSTM', 32, 8, 8, 1, dropout=0.0)
    r = recipe(model, mode)
    before = [p.detach().clone() for p in model.parameters()]
    model.decoder.weight.register_hook(lambda g: torch.full_like(g, math.nan))
    inputs, targets = tiny_batch()
    with pytest.raises(errors.TrainingDiverged):
        training.train_batch(model, r, inputs, targets, model.init_hidden(3))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_amp_non_finite_loss_raises():
    """An inf loss is not overflow of the scaled gradients: --amp does not skip it, it stops."""
    torch.manual_seed(0)
    model = RNNModel('LSTM', 32, 8, 8, 1, dropout=0.0)
    r = recipe(model, 'amp')
    with torch.no_grad():
        model.decoder.bias[0] = math.inf
    with pytest.raises(errors.TrainingDiverged):
        training.train_batch(model, r, *tiny_batch(), model.init_hidden(3))


FP16_RECIPES = {
    'fp16-manual': lambda model: ManualFP16Recipe(model, 1.0, 100.0, 128.0),
    'fp16-optimizer-static': lambda model: FP16OptimizerRecipe(model, 1.0, 100.0, 128.0),
    'fp16-optimizer-dynamic': lambda model: FP16OptimizerRecipe(model, 1.0, 100.0, dynamic_loss_scale=True),
}


@pytest.mark.parametrize('recipe', list(FP16_RECIPES))
def test_fp16_recipes_update_the_fp32_layer_norms_as_fp32_does(recipe):
    """The LayerNorms stay fp32 in an fp16 model: their grads are unscaled and their update is the fp32 recipe's."""
    g = torch.Generator().manual_seed(0)
    inputs, targets = torch.randint(24, (6, 3), generator=g), torch.randint(24, (18,), generator=g)
    torch.manual_seed(0)
    reference = TransformerModel(24, 16, 2, 32, 1, dropout=0.0)
    initial = reference.transformer.layers[0].norm1.weight.detach().clone()
    training.train_batch(reference, recipes.AutocastRecipe(reference, 1.0, 100.0), inputs, targets, None)
    torch.manual_seed(0)
    model = TransformerModel(24, 16, 2, 32, 1, dropout=0.0)
    _, hidden, updated = training.train_batch(model, FP16_RECIPES[recipe](model), inputs, targets, None)
    assert updated and hidden is None
    norm = model.transformer.layers[0].norm1.weight
    assert norm.dtype == torch.float32 and model.encoder.weight.dtype == torch.float16
    expected = reference.transformer.layers[0].norm1.weight.detach() - initial
    assert expected.abs().max() > 1e-3
    assert ((norm.detach() - initial) - expected).norm() / expected.norm() < 0.05
