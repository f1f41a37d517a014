"""Signals and a closed output, in real processes.

- SIGHUP (a closed terminal) stops training after the batch like SIGTERM: SAVE.resume, the test, exit 129;
- a second signal quits at once with 130 and no traceback, even inside torch.save, leaving only
  whole files; two signals count as two however close together they come;
- a signal during data loading is one sentence, not a traceback;
- a reader that goes away (`main.py | head -3`) does not stop training;
- generate.py stops after the current word on a signal and writes the words it has.

Standard signals are not queued: the kernel merges a second SIGINT sent while the first is still
pending, so no process could count it. Tests that send two of the same wait until /proc shows the
first delivered, which takes about a millisecond.
"""
import io
import os
import pty
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_robustness import assert_whole_json_lines, read_until

from conftest import ENV, REPO, describe, error_line, temp_files, write_corpus
from model import RNNModel
from plumbing import checkpoint, cli, errors, signals

SMALL = ['--emsize', 16, '--nhid', 16, '--batch_size', 8, '--bptt', 10, '--log-interval', 5,
         '--lr', 5, '--dropout', 0.2, '--save', 'model.pt']


# ---------------------------------------------------------------- helpers

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


def finish(proc, seen):
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
    done = finish(proc, seen)
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
    done = finish(proc, [])
    assert_clean_exit(done, 129)
    assert done.stderr == '', describe(done)
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
    done = finish(proc, seen)
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
    done = finish(proc, [])
    assert_clean_exit(done, 130)
    assert done.stdout.count('| SIGINT: stopping after this batch') == 1, describe(done)
    assert '| second signal: exiting now' in done.stdout, describe(done)
    assert 'End of training' not in done.stdout and ': error: ' not in done.stderr, describe(done)
    assert_only_whole_files(run_dir)


class InterruptedWrite(io.RawIOBase):
    """A file whose second write raises error, as a signal handler landing there would."""

    def __init__(self, error):
        self.error, self.writes = error, 0

    def writable(self):
        return True

    def write(self, b):
        self.writes += 1
        if self.writes == 2:  # torch.save passes an error in the first write through unwrapped
            raise self.error
        return len(b)


@pytest.mark.parametrize('error, rc, stderr', [
    (signals.SecondSignal(signal.SIGINT), 130, ''),
    (signals.Interrupted(signal.SIGTERM), 143, 'main.py: error: interrupted by SIGTERM before anything was saved.\n'),
], ids=['second-signal', 'interrupted'])
def test_a_signal_is_found_behind_the_runtime_error_of_torch_save(error, rc, stderr, monkeypatch, capsys):
    """torch.save's zip writer raises a RuntimeError of its own while the signal's exception propagates;
    checkpoint.load would word such an error as a corrupt file. cli.run finds the signal behind both."""
    def main(argv):
        try:
            torch.save({'weights': torch.zeros(1000)}, InterruptedWrite(error))
        except RuntimeError:
            raise errors.CheckpointError('model.pt is corrupt.') from None

    monkeypatch.setattr(sys, 'argv', ['/some/dir/main.py'])
    assert cli.guarded_main(main) == rc
    assert capsys.readouterr().err == stderr


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
    done = finish(proc, seen)
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
    done = finish(proc, [])
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
    assert_clean_exit(done, 0)
    assert err == '', describe(done)
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
    done = finish(proc, seen)
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
    done = finish(proc, seen)
    first = 'SIGHUP' if '| SIGHUP: stopping after this word' in done.stdout else 'SIGINT'
    assert_clean_exit(done, 130 if first == 'SIGHUP' else 129)
    assert f'| {first}: stopping after this word' in done.stdout, describe(done)
    assert '| second signal: exiting now' in done.stdout, describe(done)
    assert (tmp_path / 'out.txt').read_text() == 'the previous output\n'
    assert not temp_files(tmp_path)
