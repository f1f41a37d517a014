"""Today's recipes beside the classic ones (recipes.py: fp32, --amp, --bf16), flag conflicts, devices."""
import argparse
import math
import re
import subprocess

import pytest
import torch

import recipes
import training
from conftest import ENV, describe, error_line, run_script
from model import RNNModel
from plumbing import errors

TRAIN_ARGS = ['--epochs', 2, '--emsize', 16, '--nhid', 16, '--batch_size', 8, '--bptt', 10,
              '--log-interval', 5, '--save', 'model.pt', '--lr', 5, '--dropout', 0]
LOSS_RE = re.compile(r'^\| epoch +\d+ \| .*\| loss +(\d+\.\d+) \|', re.M)


@pytest.mark.parametrize('script', ['main.py', 'main_fp16_optimizer.py'])
@pytest.mark.parametrize('mode, header', [('--amp', 'amp: autocast float16'), ('--bf16', 'bf16: autocast bfloat16')])
def test_autocast_modes_train(script, mode, header, corpus_dir, tmp_path):
    proc = run_script(script, '--data', corpus_dir, *TRAIN_ARGS, mode, cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, describe(proc)
    assert 'Traceback' not in proc.stdout + proc.stderr, describe(proc)
    assert f'| precision {header}' in proc.stdout
    assert 'static_loss_scale' not in proc.stdout
    losses = [float(x) for x in LOSS_RE.findall(proc.stdout)]
    assert len(losses) >= 4 and losses[-1] < losses[0], losses
    if mode == '--amp':  # the loss scale is logged with GradScaler's initial 2**16
        assert '| loss scale 65536' in proc.stdout
    else:
        assert '| loss scale' not in proc.stdout
    assert re.search(r'\| End of training \| test loss +\d+\.\d+ \| test ppl', proc.stdout)
    assert (tmp_path / 'model.pt').exists()


@pytest.mark.parametrize('script', ['main.py', 'main_fp16_optimizer.py'])
@pytest.mark.parametrize('flags', [['--fp16', '--amp'], ['--amp', '--bf16'], ['--fp16', '--bf16']])
def test_conflicting_precision_flags(flags, script, tmp_path, call_script, capsys):
    with pytest.raises(SystemExit) as exit_:
        call_script(script, *flags, cwd=tmp_path)
    out, err = capsys.readouterr()
    proc = subprocess.CompletedProcess(flags, exit_.value.code, out, err)
    line = error_line(proc, script, 2)
    assert re.fullmatch(rf'{script}: error: argument --\w+: not allowed with argument --\w+', line), line
    assert set(re.findall(r'--\w+', line)) == set(flags), line
    assert list(tmp_path.iterdir()) == []


def test_missing_accelerator_is_a_clear_error(corpus_dir, tmp_path, call_script):
    """call_script hides accelerators, as run_script does: --accel must fail with one clear line."""
    (tmp_path / 'model.pt').write_bytes(b'')  # generate.py checks that the file exists before the device
    for script, extra in (('main.py', ['--data', corpus_dir]), ('main_fp16_optimizer.py', ['--data', corpus_dir]),
                          ('generate.py', ['--checkpoint', 'model.pt'])):
        proc = call_script(script, '--accel', *extra, cwd=tmp_path)
        line = error_line(proc, script, 2)
        assert line == f'{script}: error: --accel was given but torch.accelerator finds no accelerator (CUDA, MPS, XPU, ...).'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model.pt']


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
