"""Data-parallel training under torchrun (2 processes, gloo on the CPU): the same run as one process."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_robustness import SMALL

from conftest import ENV, REPO, describe, error_line
from plumbing import distributed

TIMINGS = {'elapsed', 'ms_per_batch', 'tokens_per_s', 'epoch_seconds'}
# dropout 0: the ranks draw no random numbers, so 2 ranks must give one process's losses.
EXACT = [*map(str, SMALL), '--dropout', '0', '--epochs', '1']


def torchrun(script, *args, cwd, nproc=2, timeout=120):
    """torchrun --standalone --nproc_per_node nproc SCRIPT ARGS, in cwd; the CompletedProcess."""
    env = dict(os.environ, **ENV, PYTHONUNBUFFERED='1', CUDA_VISIBLE_DEVICES='')
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
               str(REPO / script), *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def start_torchrun(script, *args, cwd):
    env = dict(os.environ, **ENV, PYTHONUNBUFFERED='1', CUDA_VISIBLE_DEVICES='')
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               str(REPO / script), *map(str, args)]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def records(directory):
    return [json.loads(line) for line in (directory / 'model.pt.metrics.jsonl').read_text().splitlines()]


def losses(recs):
    """(kind, epoch, batch, loss, loss scale, skipped) of each train, epoch and end record."""
    return [(r['kind'], r.get('epoch'), r.get('batch'), r.get('loss', r.get('valid_loss', r.get('test_loss'))),
             r.get('loss_scale'), r.get('skipped')) for r in recs if r['kind'] != 'run']


RECIPES = {  # script, flags, relative tolerance of the losses (fp16 and bf16 sums round differently)
    'fp32': ('main.py', [], 1e-5),
    'fp16': ('main.py', ['--fp16'], 1e-4),
    'fp16-skipping': ('main.py', ['--fp16', '--static-loss-scale', '1e6'], 1e-4),  # overflows: skips must agree
    'fp16-optimizer-dynamic': ('main_fp16_optimizer.py', ['--fp16', '--dynamic-loss-scale'], 1e-4),
    'bf16': ('main.py', ['--bf16'], 1e-3),
}


@pytest.mark.parametrize('recipe', list(RECIPES))
def test_two_ranks_train_as_one_process(recipe, tmp_path, corpus_dir, call_script):
    script, flags, tolerance = RECIPES[recipe]
    for name in ('one', 'two'):
        (tmp_path / name).mkdir()
    one = call_script(script, '--data', corpus_dir, *EXACT, *flags, cwd=tmp_path / 'one')
    assert one.returncode == 0, describe(one)
    two = torchrun(script, '--data', corpus_dir, *EXACT, *flags, cwd=tmp_path / 'two')
    assert two.returncode == 0, describe(two)
    assert '| torchrun: 2 processes, 4 of the 8 columns each' in two.stdout
    assert two.stdout.count('| End of training') == 1  # rank 0 alone prints
    expected, got = losses(records(tmp_path / 'one')), losses(records(tmp_path / 'two'))
    assert len(got) == len(expected) > 8
    for e, g in zip(expected, got):
        assert (g[:3], g[4:]) == (e[:3], e[4:])  # same records, loss scales and skips
        assert g[3] == pytest.approx(e[3], rel=tolerance), (e, g)
    if recipe == 'fp16-skipping':
        assert expected[-1][-1] > 0  # it did skip
    run = records(tmp_path / 'two')[0]
    assert run['processes'] == 2 and run['flags']['batch_size'] == 8
    assert sorted(p.name for p in (tmp_path / 'two').iterdir()) == ['model.pt', 'model.pt.metrics.jsonl',
                                                                    'model.pt.resume']


def test_resume_after_sigint_under_torchrun_continues_exactly(tmp_path, corpus_dir):
    """With dropout (each rank draws its own random numbers): stopped by Ctrl-C in epoch 2, then resumed
    by torchrun, the run writes the records of one never stopped."""
    flags = ['--data', corpus_dir, *map(str, SMALL), '--epochs', '3']
    (tmp_path / 'whole').mkdir()
    whole = torchrun('main.py', *flags, cwd=tmp_path / 'whole')
    assert whole.returncode == 0, describe(whole)

    proc = start_torchrun('main.py', *flags, cwd=tmp_path)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith('| epoch   2 |    10/'):
                proc.send_signal(signal.SIGINT)  # what Ctrl-C does: torchrun passes it on to every rank
                break
        seen.extend(proc.stdout)
    finally:
        proc.wait(timeout=120)
    out = ''.join(seen)
    assert 'Exiting from training early at epoch 2, batch ' in out, out
    assert out.count('| End of training') == 1, out
    resumed = torchrun('main.py', *flags, '--resume', 'model.pt.resume', cwd=tmp_path)
    assert resumed.returncode == 0, describe(resumed)
    strip = lambda recs: [{k: v for k, v in r.items() if k not in TIMINGS} for r in recs if r['kind'] != 'run']
    assert strip(records(tmp_path)) == strip(records(tmp_path / 'whole'))


def test_a_resume_file_continues_only_with_as_many_processes(tmp_path, corpus_dir, call_script):
    assert torchrun('main.py', '--data', corpus_dir, *map(str, SMALL), '--epochs', '1', cwd=tmp_path).returncode == 0
    proc = call_script('main.py', '--data', corpus_dir, *SMALL, '--epochs', 2, '--resume', 'model.pt.resume',
                       cwd=tmp_path)
    line = error_line(proc, 'main.py', 2)
    assert line == ('main.py: error: cannot resume from model.pt.resume: it was saved by 2 process(es) and this '
                    'run has 1 (each continues its own random numbers); resume with 2.'), line


def test_a_batch_size_the_ranks_cannot_share_is_an_error(tmp_path, corpus_dir):
    proc = torchrun('main.py', '--data', corpus_dir, *map(str, SMALL), '--batch_size', '7', cwd=tmp_path)
    assert proc.returncode != 0
    sentence = 'main.py: error: --batch_size 7 cannot be split evenly over 2 processes; give a multiple of 2.'
    assert proc.stderr.count(sentence) == 2, describe(proc)  # each rank says it, and neither trains
    assert '| epoch' not in proc.stdout and not list(tmp_path.iterdir())


def test_a_killed_rank_does_not_leave_the_other_waiting(tmp_path, corpus_dir):
    proc = start_torchrun('main.py', '--data', corpus_dir, *map(str, SMALL), '--epochs', '1000', cwd=tmp_path)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith('| epoch   2 |'):
                break
        ranks = subprocess.run(['pgrep', '-P', str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(ranks) == 2, ranks
        killed = time.monotonic()
        os.kill(int(max(ranks, key=int)), signal.SIGKILL)
        seen.extend(proc.stdout)
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.monotonic() - killed < 60
    out = ''.join(seen)
    assert proc.returncode != 0
    assert 'main.py: error: rank 0 lost contact with the other ranks (' in out, out


def test_one_process_is_rank_0_of_1_and_changes_nothing():
    world = distributed.World()
    assert (world.rank, world.size, world.is_main) == (0, 1, True)
    model = torch.nn.Linear(2, 2)
    hidden = (torch.randn(2, 8, 3), torch.randn(2, 8, 3))
    assert world.wrap(model) is model and world.columns(8) == slice(0, 8)
    assert world.gather_columns(hidden) is hidden and world.my_columns(hidden, 8) is hidden
    assert world.any(True) is True and world.from_main(2.5) == 2.5 and world.gather('x') == ['x']


def test_each_rank_takes_its_share_of_the_columns(monkeypatch):
    monkeypatch.setenv('RANK', '1')
    monkeypatch.setenv('WORLD_SIZE', '4')
    world = distributed.World()
    assert world.columns(8) == slice(2, 4) and not world.is_main
    hidden = torch.arange(2 * 8 * 3).reshape(2, 8, 3)
    assert torch.equal(world.my_columns(hidden, 8), hidden[:, 2:4])
