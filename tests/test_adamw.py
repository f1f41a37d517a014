"""--use-optimizer: every recipe updates its fp32 weights (the masters, for the fp16 recipes) with
torch.optim.AdamW at the lr as given instead of SGD; a skipped (non-finite) step leaves AdamW's
state as it was; AdamW's state travels in the recipe's state dict, so --resume continues exactly,
and a run saved with one optimizer is not resumed with the other.

The script runs are in this process (conftest's call_script), a fraction of a second each.
"""
import copy
import io
import re

import pytest
import torch
import torch.nn.functional as F
from test_fp16_optimizer_recipe import BSZ, NTOKEN, SEQ, batch, tiny_model

import main
import main_fp16_optimizer
import recipes
from conftest import describe, error_line
from plumbing import checkpoint

LR, CLIP = 0.01, 0.25
AUTOCAST = {'fp32': None, 'amp': torch.float16, 'bf16': torch.bfloat16}

RECIPES = {  # name: recipe(model, adamw)
    **{name: lambda model, adamw, dtype=dtype: recipes.AutocastRecipe(model, LR, CLIP, dtype, adamw)
       for name, dtype in AUTOCAST.items()},
    'fp16-manual': lambda model, adamw: main.ManualFP16Recipe(model, LR, CLIP, 128.0, adamw),
    'fp16-optimizer-static': lambda model, adamw: main_fp16_optimizer.FP16OptimizerRecipe(
        model, LR, CLIP, 128.0, False, adamw),
    'fp16-optimizer-dynamic': lambda model, adamw: main_fp16_optimizer.FP16OptimizerRecipe(
        model, LR, CLIP, 128.0, True, adamw),
}
SCALED = ['amp', 'fp16-manual', 'fp16-optimizer-static', 'fp16-optimizer-dynamic']  # may skip a step

# The script and flags that select each recipe.
SCRIPT_FLAGS = {
    'fp32': ('main.py', []),
    'amp': ('main.py', ['--amp']),
    'bf16': ('main.py', ['--bf16']),
    'fp16-manual': ('main.py', ['--fp16']),
    'fp16-optimizer-static': ('main_fp16_optimizer.py', ['--fp16']),
    'fp16-optimizer-dynamic': ('main_fp16_optimizer.py', ['--fp16', '--dynamic-loss-scale']),
}
TINY_RUN = ['--emsize', 16, '--nhid', 16, '--batch_size', 8, '--bptt', 10, '--log-interval', 5,
            '--dropout', 0, '--save', 'model.pt', '--lr', LR]
LOSS_RE = re.compile(r'^\| epoch +\d+ \| .*\| loss +(\d+\.\d+) \|', re.M)


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """One intra-op thread, as for the script runs: on a busy 2-core machine the tiny steps here
    take seconds with more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def same(a, b):
    """Equal nested dicts, lists and tuples of tensors and plain values (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize('name', list(RECIPES))
def test_adamw_updates_the_fp32_weights_at_the_lr_given(name):
    model = tiny_model()
    assert type(inner_optimizer(RECIPES[name](tiny_model(), False))) is torch.optim.SGD  # the default
    r = RECIPES[name](model, True)
    adamw = inner_optimizer(r)
    weights = fp32_weights(name, model, r)
    assert type(adamw) is torch.optim.AdamW
    assert [id(p) for group in adamw.param_groups for p in group['params']] == list(map(id, weights))
    assert all(w.dtype == torch.float32 for w in weights)
    assert r.optimizer.param_groups[0]['lr'] == LR  # where the loop reads and anneals it
    assert adamw.defaults['foreach'] and not adamw.defaults['fused']  # on the CPU; fused on CUDA
    before = [w.detach().clone() for w in weights]
    assert step(model, r) is True
    # AdamW's first step: decay p by lr * weight_decay, then move it by lr * g / (|g| + eps), about lr.
    decay = 1 - LR * adamw.defaults['weight_decay']
    moved = torch.cat([(w.detach() - decay * b).reshape(-1) for w, b in zip(weights, before)]).abs()
    assert LR / 2 < moved.max() <= LR * (1 + 1e-5), moved.max()
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
    r = RECIPES[name](model, True)
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


@pytest.mark.parametrize('name', list(RECIPES))
def test_state_dict_carries_adamw_and_continues_exactly(name):
    """What --resume restores: a fresh recipe loaded with the state (through torch.save, as
    SAVE.resume is) holds AdamW's moments and step count, and steps on to the same weights."""
    model = tiny_model()
    r = RECIPES[name](model, True)
    for seed in range(3):
        assert step(model, r, seed)
    file = io.BytesIO()
    torch.save({'model': model.state_dict(), 'recipe': r.state_dict()}, file)
    file.seek(0)
    saved = torch.load(file, weights_only=True)
    other_model = tiny_model(seed=1)
    other = RECIPES[name](other_model, True)
    other_model.load_state_dict(saved['model'])
    other.load_state_dict(saved['recipe'])
    assert same(adamw_state(inner_optimizer(other)), adamw_state(inner_optimizer(r)))
    for seed in range(3, 6):
        assert step(model, r, seed) and step(other_model, other, seed)
    assert all(torch.equal(a, b) for a, b in zip(other_model.parameters(), model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(fp32_weights(name, other_model, other), fp32_weights(name, model, r)))


@pytest.mark.parametrize('name', list(RECIPES))
def test_training_with_adamw_lowers_the_loss(name, corpus_dir, tmp_path, call_script, monkeypatch):
    """The scripts pass --use-optimizer to the recipe: one AdamW, stepped once per update made."""
    made, original = [], recipes.make_optimizer

    def recorded_optimizer(params, lr, adamw=False):
        made.append(original(params, lr, adamw))
        return made[-1]

    monkeypatch.setattr(recipes, 'make_optimizer', recorded_optimizer)
    script, flags = SCRIPT_FLAGS[name]
    proc = call_script(script, '--data', corpus_dir, *TINY_RUN, '--epochs', 1, *flags, '--use-optimizer', cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    header = r'^\| device cpu \| precision .+ \| optimizer AdamW \| vocabulary '
    assert re.search(header, proc.stdout, re.M), proc.stdout
    losses = [float(x) for x in LOSS_RE.findall(proc.stdout)]
    assert len(losses) >= 5 and losses[-1] < losses[0] - 0.3, losses
    assert all(f'| lr {LR:g} |' in line for line in proc.stdout.splitlines() if line.startswith('| epoch'))
    assert len(made) == 1 and type(made[0]) is torch.optim.AdamW
    nbatches = int(re.search(r'\| +\d+/ *(\d+) batches', proc.stdout).group(1))
    updates = nbatches - proc.stdout.count('| gradients are not finite')
    assert {int(s['step']) for s in made[0].state.values()} == {updates}
    assert all(p.dtype == torch.float32 for group in made[0].param_groups for p in group['params'])


def run_lines(out):
    """The progress, skipped-update, end-of-epoch and test lines, timings blanked."""
    lines = [line for line in out.splitlines() if line.startswith(('| epoch', '| gradients', '| end of', '| End of'))]
    return [re.sub(r'(ms/batch|tok/s|eta|time:) +[\d.]+s?', r'\1 _', line) for line in lines]


@pytest.mark.parametrize('name', list(RECIPES))
def test_resume_continues_exactly_with_adamw(name, corpus_dir, tmp_path, call_script):
    """2 epochs in one go == 1 epoch, then --resume for the 2nd: same lines, same weights, same AdamW
    state. Dropout > 0, so the resumed run needs the saved RNG state too."""
    script, flags = SCRIPT_FLAGS[name]
    common = ['--data', corpus_dir, *TINY_RUN, '--dropout', 0.2, *flags, '--use-optimizer']
    full_dir, split_dir = tmp_path / 'full', tmp_path / 'split'
    for directory in (full_dir, split_dir):
        directory.mkdir()
    full = call_script(script, *common, '--epochs', 2, cwd=full_dir)
    first = call_script(script, *common, '--epochs', 1, cwd=split_dir)
    second = call_script(script, *common, '--epochs', 2, '--resume', 'model.pt.resume', cwd=split_dir)
    for proc in (full, first, second):
        assert proc.returncode == 0, describe(proc)
    assert '| resuming model.pt.resume at epoch 2, batch 0' in second.stdout
    first_epoch = [line for line in run_lines(first.stdout) if not line.startswith('| End of')]
    assert run_lines(full.stdout) == first_epoch + run_lines(second.stdout)
    for file in ('model.pt', 'model.pt.resume'):
        assert same(checkpoint.load(str(full_dir / file))['model'], checkpoint.load(str(split_dir / file))['model'])
    full_state, split_state = (checkpoint.load(str(d / 'model.pt.resume'))['resume'] for d in (full_dir, split_dir))
    assert same(split_state['recipe_state'], full_state['recipe_state'])
    saved = split_state['recipe_state']
    optimizer_state = saved['optimizer_state_dict' if name.startswith('fp16-optimizer') else 'optimizer']['state']
    assert optimizer_state and all(s.keys() == {'step', 'exp_avg', 'exp_avg_sq'} for s in optimizer_state.values())


@pytest.mark.parametrize('saved, resumed', [([], ['--use-optimizer']), (['--use-optimizer'], [])])
def test_resume_refuses_the_other_optimizer(saved, resumed, corpus_dir, tmp_path, call_script):
    proc = call_script('main.py', '--data', corpus_dir, *TINY_RUN, '--epochs', 1, *saved, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    proc = call_script('main.py', '--data', corpus_dir, *TINY_RUN, '--epochs', 2, *resumed,
                       '--resume', 'model.pt.resume', cwd=tmp_path)
    line = error_line(proc, 'main.py', 2)
    assert f'--use-optimizer was {bool(saved)}, now {bool(resumed)}' in line, line
    assert '| epoch' not in proc.stdout
