"""Signals and a closed output in real runs: stop after the batch, a second signal quits, whole files only."""
import json
import math
import os
import pty
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import (ENV, REPO, SMALL, describe, end_line, error_line, finish, read_until, run_script, start_training,
                      structured_text, temp_files, write_corpus)
from model import RNNModel
from plumbing import checkpoint

# ---------------------------------------------------------------- helpers

def assert_whole_json_lines(path):
    """A metrics file: every line a whole JSON record."""
    text = Path(path).read_text()
    assert text.endswith('\n')
    for line in text.splitlines():
        json.loads(line)


@pytest.fixture
def start():
    """start(script, *args, cwd, stdout=PIPE, unbuffered=True, wrapper=()): a running script (run by the
    command wrapper, if given), killed after the test if it still runs (and after 120 s in any case,
    so that a hung run fails instead of hanging)."""
    started = []

    def start(script, *args, cwd, stdout=subprocess.PIPE, unbuffered=True, wrapper=()):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES='', **ENV)
        env.pop('PYTHONUNBUFFERED', None)
        if unbuffered:
            env['PYTHONUNBUFFERED'] = '1'
        command = [*wrapper, sys.executable, str(REPO / script), *map(str, args)]
        proc = subprocess.Popen(command, cwd=str(cwd), env=env, stdout=stdout, stderr=subprocess.PIPE, text=True)
        watchdog = threading.Timer(120, proc.kill)
        watchdog.start()
        started.append((proc, watchdog))
        return proc

    yield start
    for proc, watchdog in started:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def finish_started(proc, seen):
    rest, err = proc.communicate(timeout=110)
    return subprocess.CompletedProcess(proc.args, proc.returncode, ''.join(seen) + (rest or ''), err)


def pending_signals(pid):
    """The signals pending for pid's process and main thread: sent but not yet handed to a handler."""
    with open(f'/proc/{pid}/status') as f:
        fields = dict(line.split(':', 1) for line in f if ':' in line)
    mask = int(fields['ShdPnd'], 16) | int(fields['SigPnd'], 16)
    return {s for s in signal.Signals if mask & (1 << (s - 1))}


def send_twice(proc, signum):
    """signum, then signum again as soon as the kernel has delivered the first (see the module's docstring)."""
    proc.send_signal(signum)
    deadline = time.monotonic() + 10
    while signum in pending_signals(proc.pid):
        assert time.monotonic() < deadline, 'the first signal was never delivered'
        time.sleep(0.0005)
    proc.send_signal(signum)


def wait_for(condition, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f'timed out waiting for {what}'
        time.sleep(0.002)


def assert_clean_exit(done, rc):
    assert done.returncode == rc, describe(done)
    for text in (done.stdout, done.stderr):
        for sign in ('Traceback', 'KeyboardInterrupt', 'BrokenPipe', 'Exception ignored'):
            assert sign not in text, describe(done)


def assert_only_whole_files(directory):
    """No temporary file is left, every checkpoint is whole, and the metrics file holds whole records."""
    assert not temp_files(directory), temp_files(directory)
    for path in Path(directory).iterdir():
        if path.name.endswith('.metrics.jsonl'):
            assert_whole_json_lines(path)
        elif not path.name.startswith('.'):  # a lock file
            checkpoint.load(str(path))


def resume_progress(directory):
    return checkpoint.load(str(Path(directory) / 'model.pt.resume'))['resume']['progress']


# ---------------------------------------------------------------- training

def test_sighup_stops_after_the_batch_like_sigterm(tmp_path, corpus_dir, start):
    proc = start('main.py', '--data', corpus_dir, *SMALL, '--epochs', 1000, cwd=tmp_path)
    seen = []
    assert read_until(proc, '| epoch   2 |', seen), ''.join(seen)
    proc.send_signal(signal.SIGHUP)
    done = finish_started(proc, seen)
    assert_clean_exit(done, 129)
    assert ': error: ' not in done.stderr, describe(done)
    assert '| SIGHUP: stopping after this batch' in done.stdout
    assert 'Exiting from training early' in done.stdout and '| End of training |' in done.stdout
    assert_only_whole_files(tmp_path)
    assert resume_progress(tmp_path)['epoch'] >= 2


def test_sighup_after_the_terminal_closed(tmp_path, corpus_dir, start):
    """A closed terminal: writes to it fail (EIO) and SIGHUP comes. The run still stops cleanly and saves."""
    controller, terminal = pty.openpty()
    try:
        proc = start('main.py', '--data', corpus_dir, *SMALL, '--epochs', 1000, cwd=tmp_path, stdout=terminal)
    finally:
        os.close(terminal)
    shown = b''
    while b'| epoch   2 |' not in shown:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: the run has ended and closed its end of the terminal
            chunk = b''
        assert chunk, shown.decode(errors='replace')
        shown += chunk
    os.close(controller)
    proc.send_signal(signal.SIGHUP)
    done = finish_started(proc, [])
    assert_clean_exit(done, 129)  # no traceback
    # nothing said about the terminal's failed writes (EIO), and no error line: the stop was clean
    assert 'Input/output error' not in done.stderr and ': error: ' not in done.stderr, describe(done)
    assert_only_whole_files(tmp_path)
    assert resume_progress(tmp_path)['epoch'] >= 2


def test_sighup_stays_ignored_under_nohup(tmp_path, corpus_dir, start):
    """nohup starts the run with SIGHUP ignored so that it outlives its terminal; it must stay ignored."""
    proc = start('main.py', '--data', corpus_dir, *SMALL, '--epochs', 1000, cwd=tmp_path, wrapper=['nohup'])
    seen = []
    assert read_until(proc, '| end of epoch   1', seen), ''.join(seen)
    proc.send_signal(signal.SIGHUP)
    assert read_until(proc, '| end of epoch   3', seen), ''.join(seen)  # still training
    proc.send_signal(signal.SIGINT)
    done = finish_started(proc, seen)
    assert_clean_exit(done, 0)
    assert 'SIGHUP' not in done.stdout, describe(done)


def big_vocabulary_corpus(directory, nwords=5000):
    """Every one of nwords words in the training text: with --emsize 4096 the embedding alone is 80 MB,
    so each save takes a while, and with --nhid 16 a batch still takes only tens of milliseconds."""
    words = [f'w{i}' for i in range(nwords)]
    train = '\n'.join(' '.join(words[i:i + 10]) for i in range(0, nwords, 10)) + '\n'
    held_out = ' '.join(words[:300]) + '\n'
    return write_corpus(directory, train, held_out, held_out)


def writing(directory):
    """Whether a temporary file in directory has content: torch.save is writing its records."""
    for path in Path(directory).glob('.*.tmp'):
        try:
            if path.stat().st_size:
                return True
        except FileNotFoundError:  # renamed meanwhile
            pass
    return False


def test_second_signal_during_a_save_exits_130_leaving_whole_files(tmp_path, start):
    """Both signals land while torch.save writes model.pt's temporary file: the second is raised
    inside torch.save, whose zip writer then raises a RuntimeError of its own during it."""
    corpus = big_vocabulary_corpus(tmp_path / 'corpus')
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    proc = start('main.py', '--data', corpus, '--emsize', 4096, '--nhid', 16, '--batch_size', 20, '--bptt', 35,
                 '--log-interval', 1000, '--epochs', 1000, '--save', 'model.pt', cwd=run_dir)
    wait_for(lambda: writing(run_dir) or proc.poll() is not None, 'the save of model.pt')
    send_twice(proc, signal.SIGINT)
    done = finish_started(proc, [])
    assert_clean_exit(done, 130)
    assert done.stdout.count('| SIGINT: stopping after this batch') == 1, describe(done)
    assert '| second signal: exiting now' in done.stdout, describe(done)
    assert 'End of training' not in done.stdout and ': error: ' not in done.stderr, describe(done)
    assert_only_whole_files(run_dir)


def test_two_signals_close_together_count_as_two(tmp_path, corpus_dir, start):
    """The second comes about a millisecond after the first, while the run is inside one of torch's
    C calls, where Python cannot run a handler: CPython then runs the handler once for both. With
    --bptt 100 a batch is two long C calls (the LSTM's forward over 100 steps, and its backward)."""
    proc = start('main.py', '--data', corpus_dir, '--emsize', 512, '--nhid', 512, '--batch_size', 8, '--bptt', 100,
                 '--log-interval', 1000, '--epochs', 1000, '--save', 'model.pt', cwd=tmp_path)
    seen = []
    assert read_until(proc, '| device', seen), ''.join(seen)
    time.sleep(0.3)  # into the first batches: a batch takes about half a second
    send_twice(proc, signal.SIGINT)
    done = finish_started(proc, seen)
    assert_clean_exit(done, 130)
    assert '| second signal: exiting now' in done.stdout, describe(done)
    assert 'End of training' not in done.stdout
    assert_only_whole_files(tmp_path)


@pytest.fixture(scope='module')
def long_corpus(tmp_path_factory, corpus_dir):
    """The tiny corpus's training text 1000 times (3 million tokens): loading it takes a second or more."""
    train = (corpus_dir / 'train.txt').read_text() * 1000
    return write_corpus(tmp_path_factory.mktemp('long-corpus'), train,
                        (corpus_dir / 'valid.txt').read_text(), (corpus_dir / 'test.txt').read_text())


def reading_a_file_in(pid, directory):
    """Whether process pid has a file in directory open."""
    fds = Path(f'/proc/{pid}/fd')
    for fd in fds.iterdir():
        try:
            if Path(os.readlink(fd)).parent == directory:
                return True
        except OSError:  # closed meanwhile
            pass
    return False


@pytest.mark.parametrize('signame, rc', [('SIGINT', 130), ('SIGTERM', 143)])
def test_signal_during_data_loading_is_one_sentence(signame, rc, tmp_path, long_corpus, start):
    proc = start('main.py', '--data', long_corpus, *SMALL, '--epochs', 1, cwd=tmp_path)
    wait_for(lambda: proc.poll() is not None or reading_a_file_in(proc.pid, long_corpus), 'the corpus to be read')
    proc.send_signal(getattr(signal, signame))
    done = finish_started(proc, [])
    line = error_line(done, 'main.py', rc)
    assert line == f'main.py: error: interrupted by {signame} before anything was saved.', describe(done)
    assert '| device' not in done.stdout  # it was still loading
    assert list(tmp_path.iterdir()) == []


def test_a_reader_that_goes_away_does_not_stop_training(tmp_path, corpus_dir, start):
    """`main.py | head -3`: stdout is a pipe (block-buffered, as it is without PYTHONUNBUFFERED) whose
    reader closes it after 3 lines; the run goes on to the end and exits 0."""
    proc = start('main.py', '--data', corpus_dir, *SMALL, '--epochs', 3, cwd=tmp_path, unbuffered=False)
    head = [proc.stdout.readline() for _ in range(3)]
    assert head[0].startswith('| device'), head
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=110)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, ''.join(head), err)
    assert_clean_exit(done, 0)  # no traceback, nothing about the broken pipe
    assert ': error: ' not in err and 'Broken pipe' not in err, describe(done)
    assert_only_whole_files(tmp_path)
    assert resume_progress(tmp_path)['epoch'] == 4  # all 3 epochs trained
    assert checkpoint.load(str(tmp_path / 'model.pt'))['best_val_loss'] is not None


# ---------------------------------------------------------------- generate.py

@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
    """A best-model checkpoint of an untrained tiny LSTM over 16 words."""
    torch.manual_seed(0)
    model = RNNModel('LSTM', 16, 8, 8, 1, 0.0, False)
    vocabulary = SimpleNamespace(idx2word=[f'w{i}' for i in range(16)], padding=[])
    path = tmp_path_factory.mktemp('checkpoint') / 'model.pt'
    checkpoint.save(checkpoint.model_checkpoint(model, vocabulary, SimpleNamespace(), 1.0), path)
    return path


GENERATE = ['--checkpoint', 'model.pt', '--words', 10_000_000, '--log-interval', 1000, '--outf', 'out.txt']


@pytest.mark.parametrize('signame, rc', [('SIGINT', 0), ('SIGTERM', 143)])
def test_generate_stops_after_the_word_and_writes_what_it_has(signame, rc, tmp_path, tiny_checkpoint, start):
    (tmp_path / 'model.pt').write_bytes(tiny_checkpoint.read_bytes())
    proc = start('generate.py', *GENERATE, cwd=tmp_path)
    seen = []
    assert read_until(proc, '| Generated 1000/', seen), ''.join(seen)
    proc.send_signal(getattr(signal, signame))
    done = finish_started(proc, seen)
    assert_clean_exit(done, rc)
    lines = [line for line in done.stdout.splitlines() if line.startswith('| stopped by')]
    assert len(lines) == 1, describe(done)
    words = len((tmp_path / 'out.txt').read_text().split())
    assert lines[0] == f'| stopped by {signame} after {words} of 10000000 words; {words} words written to out.txt'
    assert 1000 <= words < 10_000_000
    assert not temp_files(tmp_path)


def test_generate_second_signal_leaves_the_output_untouched(tmp_path, tiny_checkpoint, start):
    """SIGHUP and SIGINT sent back to back (the kernel does not merge different signals, but may
    deliver them in either order): the second quits at once with 128 + its number, and the
    previous --outf stays as it was."""
    (tmp_path / 'model.pt').write_bytes(tiny_checkpoint.read_bytes())
    (tmp_path / 'out.txt').write_text('the previous output\n')
    proc = start('generate.py', *GENERATE, cwd=tmp_path)
    seen = []
    assert read_until(proc, '| Generated 1000/', seen), ''.join(seen)
    proc.send_signal(signal.SIGHUP)
    proc.send_signal(signal.SIGINT)
    done = finish_started(proc, seen)
    first = 'SIGHUP' if '| SIGHUP: stopping after this word' in done.stdout else 'SIGINT'
    assert_clean_exit(done, 130 if first == 'SIGHUP' else 129)
    assert f'| {first}: stopping after this word' in done.stdout, describe(done)
    assert '| second signal: exiting now' in done.stdout, describe(done)
    assert (tmp_path / 'out.txt').read_text() == 'the previous output\n'
    assert not temp_files(tmp_path)


@pytest.mark.parametrize('signame, expected_rc', [('SIGINT', 0), ('SIGTERM', 143)])
def test_signal_stops_after_the_batch(signame, expected_rc, tmp_path, corpus_dir):
    proc, watchdog = start_training(tmp_path, corpus_dir)
    seen = []
    try:
        assert read_until(proc, '| end of epoch', seen), ''.join(seen)
        proc.send_signal(getattr(signal, signame))
    finally:
        done = finish(proc, watchdog, seen)
    out = done.stdout
    assert done.returncode == expected_rc, describe(done)
    assert 'Traceback' not in out + done.stderr and 'KeyboardInterrupt' not in out + done.stderr, describe(done)
    assert ': error: ' not in done.stderr, describe(done)
    assert f'| {signame}: stopping after this batch' in out
    ckpt = checkpoint.load(str(tmp_path / 'model.pt.resume'))
    state = ckpt['resume']['progress']
    assert (f'Exiting from training early at epoch {state["epoch"]}, batch {state["next_batch"]}; '
            'continue with --resume model.pt.resume') in out
    assert math.isfinite(float(re.search(r'test loss +(\S+)', end_line(out)).group(1)))  # the test still ran
    assert not temp_files(tmp_path)

    finished = out.count('| end of epoch')
    assert state['epoch'] == finished + 1 and finished < 1000, (state['epoch'], state['next_batch'], out)
    if state['next_batch']:  # stopped inside an epoch
        assert state['hidden'] is not None  # the RNN state carried into the next batch
    best = checkpoint.load(str(tmp_path / 'model.pt'))
    valid = [float(v) for v in re.findall(r'\| valid loss +(\d+\.\d+)', out)]
    assert best['best_val_loss'] == pytest.approx(min(valid), abs=0.006)
    checkpoint.load_model(str(tmp_path / 'model.pt'))

    if signame == 'SIGINT':  # continue the interrupted run to the end of its epoch
        epoch, batch = state['epoch'], state['next_batch']
        cont = run_script('main.py', '--data', corpus_dir, *SMALL, '--epochs', epoch, '--resume', 'model.pt.resume',
                          cwd=tmp_path, env=ENV)
        assert cont.returncode == 0, describe(cont)
        assert f'| resuming model.pt.resume at epoch {epoch}, batch {batch}' in cont.stdout
        logged = [int(n) for n in re.findall(rf'^\| epoch +{epoch} \| +(\d+)/', cont.stdout, re.MULTILINE)]
        assert logged and logged[0] > batch and '| epoch' not in cont.stdout.split(f'| end of epoch {epoch:3d}')[1]
        assert cont.stdout.count('| end of epoch') == 1
        end_line(cont.stdout)
        after = checkpoint.load(str(tmp_path / 'model.pt.resume'))['resume']['progress']
        assert (after['epoch'], after['next_batch']) == (epoch + 1, 0)


@pytest.fixture(scope='module')
def long_test_corpus(tmp_path_factory, corpus_dir):
    """The tiny corpus with a 200k-token test split: evaluating it after a stop takes about a second."""
    d = tmp_path_factory.mktemp('long-test-corpus')
    for split in ('train', 'valid'):
        shutil.copy(corpus_dir / f'{split}.txt', d / f'{split}.txt')
    (d / 'test.txt').write_text(structured_text(random.Random(5), 200_000))
    return d


@pytest.mark.parametrize('when', ['right-after-the-first', 'during-the-test-evaluation'])
def test_second_signal_quits_at_once_leaving_whole_files(when, tmp_path, long_test_corpus):
    """Right after the first SIGINT the run is saving model.pt or SAVE.resume; a little later it is
    evaluating the long test split. Either way a second SIGINT exits 130 at once and leaves only whole files."""
    proc, watchdog = start_training(tmp_path, long_test_corpus)
    seen = []
    try:
        assert read_until(proc, '| end of epoch', seen), ''.join(seen)
        proc.send_signal(signal.SIGINT)
        wait_for = 'stopping after this batch' if when == 'right-after-the-first' else 'Exiting from training early'
        assert read_until(proc, wait_for, seen), ''.join(seen)
        proc.send_signal(signal.SIGINT)
    finally:
        done = finish(proc, watchdog, seen)
    assert done.returncode == 130, describe(done)
    assert '| second signal: exiting now' in done.stdout
    assert 'End of training' not in done.stdout
    assert 'Traceback' not in done.stdout + done.stderr, describe(done)
    files = sorted(p.name for p in tmp_path.iterdir())
    if when == 'during-the-test-evaluation':
        assert files == ['model.pt', 'model.pt.metrics.jsonl', 'model.pt.resume'], files
    assert not [f for f in files if f.endswith('.tmp')], files
    for f in files:
        if f.endswith('.metrics.jsonl'):
            assert_whole_json_lines(tmp_path / f)
        else:
            checkpoint.load(str(tmp_path / f))  # every other file left is a whole checkpoint
