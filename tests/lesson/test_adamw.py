"""--use-optimizer adamw in the recipes: AdamW updates the fp32 weights; skipped steps and its state."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F

import main
import main_fp16_optimizer
import recipes
from conftest import ADAMW_CLIP, ADAMW_LR, BSZ, NTOKEN, batch, same, tiny_model

AUTOCAST = {'fp32': None, 'amp': torch.float16, 'bf16': torch.bfloat16}

ADAMW_RECIPES = {  # name: recipe(model, adamw)
    **{name: lambda model, adamw, dtype=dtype: recipes.AutocastRecipe(model, ADAMW_LR, ADAMW_CLIP, dtype, adamw)
       for name, dtype in AUTOCAST.items()},
    'fp16-manual': lambda model, adamw: main.ManualFP16Recipe(model, ADAMW_LR, ADAMW_CLIP, 128.0, adamw),
    'fp16-optimizer-static': lambda model, adamw: main_fp16_optimizer.FP16OptimizerRecipe(
        model, ADAMW_LR, ADAMW_CLIP, 128.0, False, adamw),
    'fp16-optimizer-dynamic': lambda model, adamw: main_fp16_optimizer.FP16OptimizerRecipe(
        model, ADAMW_LR, ADAMW_CLIP, 128.0, True, adamw),
}
SCALED = ['amp', 'fp16-manual', 'fp16-optimizer-static', 'fp16-optimizer-dynamic']  # may skip a step


def step(model, recipe, seed=3):
    """One forward and recipe.step; whether the update was made."""
    inputs, targets = batch(seed)
    with recipe.autocast():
        output, _ = model(inputs, model.init_hidden(BSZ))
        loss = F.cross_entropy(output.view(-1, NTOKEN).float(), targets)
    return recipe.step(loss)


def inner_optimizer(recipe):
    """The torch optimizer that updates the weights (FP16_Optimizer wraps one)."""
    return getattr(recipe.optimizer, 'optimizer', recipe.optimizer)


def fp32_weights(name, model, recipe):
    """The fp32 tensors the optimizer must update: the model's own, or its masters."""
    if name == 'fp16-manual':
        return recipe.master_params
    if name.startswith('fp16-optimizer'):
        return recipe.optimizer.all_fp32_from_fp16_params
    return list(model.parameters())


def adamw_state(optimizer):
    """A copy of the optimizer's per-parameter state (step, exp_avg, exp_avg_sq)."""
    return copy.deepcopy(optimizer.state_dict()['state'])


@pytest.mark.parametrize('name', list(ADAMW_RECIPES))
def test_adamw_updates_the_fp32_weights_at_the_lr_given(name):
    model = tiny_model()
    assert type(inner_optimizer(ADAMW_RECIPES[name](tiny_model(), False))) is torch.optim.SGD  # the default
    r = ADAMW_RECIPES[name](model, True)
    adamw = inner_optimizer(r)
    weights = fp32_weights(name, model, r)
    assert type(adamw) is torch.optim.AdamW
    assert [id(p) for group in adamw.param_groups for p in group['params']] == list(map(id, weights))
    assert all(w.dtype == torch.float32 for w in weights)
    assert r.optimizer.param_groups[0]['lr'] == ADAMW_LR  # where the loop reads and anneals it
    assert adamw.defaults['foreach'] and not adamw.defaults['fused']  # on the CPU; fused on CUDA
    before = [w.detach().clone() for w in weights]
    assert step(model, r) is True
    # AdamW's first step: decay p by lr * weight_decay, then move it by lr * g / (|g| + eps), about lr.
    decay = 1 - ADAMW_LR * adamw.defaults['weight_decay']
    moved = torch.cat([(w.detach() - decay * b).reshape(-1) for w, b in zip(weights, before)]).abs()
    assert ADAMW_LR / 2 < moved.max() <= ADAMW_LR * (1 + 1e-5), moved.max()
    assert all(int(s['step']) == 1 for s in adamw.state.values()) and len(adamw.state) == len(weights)
    if name.startswith('fp16'):  # the fp16 model follows its masters
        assert all(torch.equal(p, w.detach().half()) for p, w in zip(model.parameters(), weights))


def poison(grad):
    grad = grad.clone()
    grad.view(-1)[0] = float('inf')
    return grad


@pytest.mark.parametrize('name', SCALED)
def test_a_skipped_step_leaves_adamw_as_it_was(name):
    """Non-finite gradients of a scaled loss: no update, and AdamW's step count and moments stay."""
    model = tiny_model()
    r = ADAMW_RECIPES[name](model, True)
    adamw = inner_optimizer(r)
    assert step(model, r) is True
    state, weights = adamw_state(adamw), [p.detach().clone() for p in model.parameters()]
    handle = model.decoder.bias.register_hook(poison)
    assert step(model, r, seed=4) is False
    handle.remove()
    assert same(adamw_state(adamw), state)
    assert all(int(s['step']) == 1 for s in adamw.state.values())
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert step(model, r, seed=5) is True
    assert all(int(s['step']) == 2 for s in adamw.state.values())


@pytest.mark.parametrize('name', list(ADAMW_RECIPES))
def test_state_dict_carries_adamw_and_continues_exactly(name):
    """What --resume restores: a fresh recipe loaded with the state (through torch.save, as
    SAVE.resume is) holds AdamW's moments and step count, and steps on to the same weights."""
    model = tiny_model()
    r = ADAMW_RECIPES[name](model, True)
    for seed in range(3):
        assert step(model, r, seed)
    file = io.BytesIO()
    torch.save({'model': model.state_dict(), 'recipe': r.state_dict()}, file)
    file.seek(0)
    saved = torch.load(file, weights_only=True)
    other_model = tiny_model(seed=1)
    other = ADAMW_RECIPES[name](other_model, True)
    other_model.load_state_dict(saved['model'])
    other.load_state_dict(saved['recipe'])
    assert same(adamw_state(inner_optimizer(other)), adamw_state(inner_optimizer(r)))
    for seed in range(3, 6):
        assert step(model, r, seed) and step(other_model, other, seed)
    assert all(torch.equal(a, b) for a, b in zip(other_model.parameters(), model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(fp32_weights(name, other_model, other), fp32_weights(name, model, r)))
