"""Today's recipes beside the classic ones: --amp and --bf16, flag conflicts, devices, the benchmark."""
import argparse
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

import training
from conftest import ENV, run_script
from model import RNNModel

TRAIN_ARGS = ['--epochs', 2, '--emsize', 16, '--nhid', 16, '--batch_size', 8, '--bptt', 10,
              '--log-interval', 5, '--save', 'model.pt', '--lr', 5, '--dropout', 0]
LOSS_RE = re.compile(r'^\| epoch +\d+ \| .*\| loss +(\d+\.\d+) \|', re.M)


@pytest.mark.parametrize('script', ['main.py', 'main_fp16_optimizer.py'])
@pytest.mark.parametrize('mode, header', [('--amp', 'amp: autocast float16'), ('--bf16', 'bf16: autocast bfloat16')])
def test_autocast_modes_train(script, mode, header, corpus_dir, tmp_path):
    proc = run_script(script, '--data', corpus_dir, *TRAIN_ARGS, mode, cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f'| precision {header}' in proc.stdout
    losses = [float(x) for x in LOSS_RE.findall(proc.stdout)]
    assert len(losses) >= 4 and losses[-1] < losses[0], losses
    if mode == '--amp':  # the loss scale is logged with GradScaler's initial 2**16
        assert '| loss scale 65536' in proc.stdout
    else:
        assert '| loss scale' not in proc.stdout
    assert re.search(r'\| End of training \| test loss +\d+\.\d+ \| test ppl', proc.stdout)
    assert (tmp_path / 'model.pt').exists()


@pytest.mark.parametrize('flags', [['--fp16', '--amp'], ['--amp', '--bf16'], ['--fp16', '--bf16']])
def test_conflicting_precision_flags(flags, tmp_path):
    proc = run_script('main.py', *flags, cwd=tmp_path)
    assert proc.returncode == 2
    assert 'Traceback' not in proc.stderr
    assert re.search(r'argument --\w+: not allowed with argument --\w+', proc.stderr), proc.stderr


def test_missing_accelerator_is_a_clear_error(corpus_dir, tmp_path):
    if torch.accelerator.is_available():
        pytest.skip('this machine has an accelerator')
    (tmp_path / 'model.pt').write_bytes(b'')  # generate.py checks that the file exists before the device
    for script, extra in (('main.py', ['--data', corpus_dir]), ('generate.py', ['--checkpoint', 'model.pt'])):
        proc = run_script(script, '--accel', *extra, cwd=tmp_path)
        assert proc.returncode != 0
        assert 'Traceback' not in proc.stderr
        assert '--accel was given but torch.accelerator finds no accelerator' in proc.stderr


def make_stepper(model, **flags):
    args = argparse.Namespace(lr=1.0, clip=10.0, static_loss_scale=1.0, fp16=False, amp=False, bf16=False)
    for key, value in flags.items():
        setattr(args, key, value)
    return training.SGDStep(model, args)


def tiny_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(32, (5, 3), generator=g), torch.randint(32, (15,), generator=g)


def test_amp_step_on_cpu_skips_overflow_and_lowers_the_scale():
    torch.manual_seed(0)
    model = RNNModel('LSTM', 32, 8, 8, 1, dropout=0.0)
    stepper = make_stepper(model, amp=True)
    inputs, targets = tiny_batch()
    before = [p.detach().clone() for p in model.parameters()]
    scale = stepper.loss_scale
    model.decoder.weight.register_hook(lambda g: torch.full_like(g, math.inf))
    training.train_batch(model, stepper, inputs, targets, model.init_hidden(3))
    assert stepper.skipped == 1
    assert stepper.loss_scale == scale / 2
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_amp_and_bf16_steps_follow_fp32():
    """One autocast step changes the weights like the fp32 step does, up to low-precision rounding."""
    inputs, targets = tiny_batch(1)
    updated = {}
    for mode in ('fp32', 'amp', 'bf16'):
        torch.manual_seed(0)
        model = RNNModel('GRU', 32, 8, 8, 1, dropout=0.0)
        stepper = make_stepper(model, amp=mode == 'amp', bf16=mode == 'bf16')
        training.train_batch(model, stepper, inputs, targets, model.init_hidden(3))
        assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 weights in every mode
        updated[mode] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.manual_seed(0)
    initial = torch.cat([p.detach().flatten() for p in RNNModel('GRU', 32, 8, 8, 1, dropout=0.0).parameters()])
    fp32_update = updated['fp32'] - initial
    assert fp32_update.abs().max() > 1e-3
    for mode, tol in (('amp', 1e-2), ('bf16', 5e-2)):
        relative_error = (updated[mode] - initial - fp32_update).norm() / fp32_update.norm()
        assert 0 < relative_error < tol, (mode, relative_error)


def test_fp32_divergence_raises():
    torch.manual_seed(0)
    model = RNNModel('LSTM', 32, 8, 8, 1, dropout=0.0)
    stepper = make_stepper(model)
    model.decoder.weight.register_hook(lambda g: torch.full_like(g, math.nan))
    inputs, targets = tiny_batch()
    with pytest.raises(training.TrainingDiverged):
        training.train_batch(model, stepper, inputs, targets, model.init_hidden(3))
