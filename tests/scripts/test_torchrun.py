"""Data-parallel training under torchrun (2 processes, gloo on the CPU): the same run as one process."""
import os
import signal
import subprocess
import time

import pytest

from conftest import SMALL, describe, losses, records, start_torchrun, torchrun

# torchrun starts real processes that talk over loopback: minutes, and timing-sensitive on a busy machine.
pytestmark = pytest.mark.slow

# dropout 0: the ranks draw no random numbers, so 2 ranks must give one process's losses.
EXACT = [*map(str, SMALL), '--dropout', '0', '--epochs', '1']


TORCHRUN_RECIPES = {  # script, flags, relative tolerance of the losses (fp16 and bf16 sums round differently)
    'fp32': ('main.py', [], 1e-5),
    'fp16': ('main.py', ['--fp16'], 1e-4),
    'fp16-skipping': ('main.py', ['--fp16', '--static-loss-scale', '1e6'], 1e-4),  # overflows: skips must agree
    'fp16-optimizer-dynamic': ('main_fp16_optimizer.py', ['--fp16', '--dynamic-loss-scale'], 1e-4),
    'bf16': ('main.py', ['--bf16'], 1e-3),
}


@pytest.mark.parametrize('recipe', list(TORCHRUN_RECIPES))
def test_two_ranks_train_as_one_process(recipe, tmp_path, corpus_dir, call_script):
    script, flags, tolerance = TORCHRUN_RECIPES[recipe]
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
