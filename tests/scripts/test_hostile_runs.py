"""Issue 20, end to end: real processes, files, links and signals, as a hostile user would try them.
Each test is one instance of a class of the issue: files that are not the run's, numbers that are not
the run's, the metrics file on resume, tracebacks, waits for other ranks, lost input, smaller ones."""
import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import ENV, REPO, START_UP_LINE, describe, error_line, make_tiny_corpus, run_script
from plumbing import checkpoint

TINY = ['--emsize', 16, '--nhid', 16, '--nlayers', 1, '--batch_size', 4, '--bptt', 10, '--dropout', 0,
        '--log-interval', 20]


def train(cwd, corpus, *flags, script='main.py', epochs=1):
    proc = run_script(script, '--data', corpus, *TINY, '--epochs', epochs, *flags, cwd=cwd, env=ENV)
    return proc


def trained(cwd, corpus, *flags, epochs=1):
    proc = train(cwd, corpus, *flags, epochs=epochs)
    assert proc.returncode == 0, describe(proc)
    return proc


def start(*args, cwd, env=None):
    """`python ARGS` in cwd, started: a Popen with stdout and stderr as pipes of bytes."""
    full_env = dict(os.environ, **ENV, PYTHONUNBUFFERED='1', CUDA_VISIBLE_DEVICES='', **(env or {}))
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=str(cwd), env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def wait_for(proc, text, timeout=60):
    """Read proc's stdout until it holds text; what was read."""
    seen, deadline = b'', time.time() + timeout
    while text.encode() not in seen:
        assert time.time() < deadline and proc.poll() is None, seen.decode(errors='replace')
        if select.select([proc.stdout], [], [], 0.5)[0]:
            seen += os.read(proc.stdout.fileno(), 65536)
    return seen.decode()


def finish(proc, timeout=60):
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(), err.decode())


def end_line(proc):
    return next(line for line in proc.stdout.splitlines() if line.startswith('| End of training'))


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- 1. files that are not the run's

def test_a_hard_linked_metrics_file_is_never_written_into(tmp_path, corpus_dir):
    notes = tmp_path / 'notes.txt'
    notes.write_text('my notes\n')
    os.link(notes, tmp_path / 'model.pt.metrics.jsonl')
    trained(tmp_path, corpus_dir)
    assert notes.read_text() == 'my notes\n'
    os.unlink(tmp_path / 'model.pt.metrics.jsonl')
    os.link(notes, tmp_path / 'model.pt.metrics.jsonl')
    trained(tmp_path, corpus_dir, '--resume', 'model.pt.resume', epochs=2)  # resume cuts no file
    assert notes.read_text() == 'my notes\n'


def test_a_lock_file_that_is_a_symlink_is_not_followed(tmp_path, corpus_dir):
    target = tmp_path / 'precious.txt'
    target.write_text('keep\n')
    (tmp_path / '.model.pt.lock').symlink_to(target)
    line = error_line(train(tmp_path, corpus_dir), 'main.py', 2)
    assert line.endswith('the lock file of --save model.pt, cannot be used (a symbolic link); remove it.'), line
    assert target.read_text() == 'keep\n' and (tmp_path / '.model.pt.lock').is_symlink()


def test_save_may_not_be_the_resume_input(tmp_path, corpus_dir):
    trained(tmp_path, corpus_dir)
    before = (tmp_path / 'model.pt.resume').read_bytes()
    proc = train(tmp_path, corpus_dir, '--save', 'model.pt.resume', '--resume', 'model.pt.resume',
                 epochs=2)
    line = error_line(proc, 'main.py', 2)
    assert 'is the same file as --resume model.pt.resume' in line, line
    assert (tmp_path / 'model.pt.resume').read_bytes() == before


def test_runs_that_would_write_one_file_cannot_both_start(tmp_path, corpus_dir):
    first = start(REPO / 'main.py', '--data', corpus_dir, *TINY, '--epochs', 1000, '--save', 'x.pt',
                  '--log-interval', 1, cwd=tmp_path)
    try:
        wait_for(first, '| epoch')
        proc = train(tmp_path, corpus_dir, '--save', 'x.pt.resume')
        line = error_line(proc, 'main.py', 2)
        assert line == (f'main.py: error: --save x.pt.resume is in use by another run (process {first.pid}); '
                        'wait for it to finish or give another --save.'), line
    finally:
        first.kill()
        finish(first)


# ---------------------------------------------------------------- 2. numbers that are not the run's

def test_a_resume_with_another_save_never_tests_that_model(tmp_path, corpus_dir):
    a = trained(tmp_path, corpus_dir, '--save', 'a.pt')
    trained(tmp_path, corpus_dir, '--save', 'b.pt', '--seed', 7, '--lr', 2)  # another model in b.pt
    b_model = (tmp_path / 'b.pt').read_bytes()
    proc = trained(tmp_path, corpus_dir, '--save', 'b.pt', '--resume', 'a.pt.resume')
    assert "b.pt holds another run's model" in proc.stdout, describe(proc)
    assert end_line(proc) == end_line(a)  # the resumed run's own weights: a's best, of epoch 1
    assert (tmp_path / 'b.pt').read_bytes() == b_model


@pytest.mark.parametrize('script', ['main.py', 'main_fp16_optimizer.py'])
def test_a_run_whose_every_update_overflows_stops_as_diverged(script, tmp_path, corpus_dir):
    proc = train(tmp_path, corpus_dir, '--fp16', '--static-loss-scale', '1e30', script=script, epochs=3)
    line = error_line(proc, script, 1)
    assert 'updates of the epoch were skipped for non-finite gradients' in line and line.endswith('no model was saved.')
    assert not (tmp_path / 'model.pt').exists() and '| end of epoch' not in proc.stdout


def test_a_dynamic_loss_scale_stops_when_the_loss_itself_is_nan(tmp_path, corpus_dir):
    proc = train(tmp_path, corpus_dir, '--fp16', '--dynamic-loss-scale', '--lr', '1e6', script='main_fp16_optimizer.py',
                 epochs=3)
    line = error_line(proc, 'main_fp16_optimizer.py', 1)
    assert 'the loss itself became inf or NaN, which no loss scale can make finite' in line, line
    assert proc.stdout.count('update skipped') < 5


@pytest.mark.parametrize('environment, sentence', [
    ({'WORLD_SIZE': '1', 'RANK': '3'}, 'do not describe a process of torchrun'),
    ({'WORLD_SIZE': '0'}, 'do not describe a process of torchrun'),
    ({'WORLD_SIZE': 'abc'}, 'WORLD_SIZE=abc in the environment is not a whole number'),
    ({'WORLD_SIZE': '2'}, 'MASTER_ADDR and MASTER_PORT are not set'),
])
def test_torchruns_variables_left_in_the_environment_are_a_sentence(environment, sentence, tmp_path, corpus_dir):
    env = {**ENV, **environment}
    proc = run_script('main.py', '--data', corpus_dir, *TINY, '--dry-run', cwd=tmp_path, env=env)
    assert sentence in error_line(proc, 'main.py', 2)


# ---------------------------------------------------------------- 3. the metrics file on resume

def test_a_metrics_file_cut_mid_record_is_started_anew_on_resume(tmp_path, corpus_dir):
    trained(tmp_path, corpus_dir)
    path = tmp_path / 'model.pt.metrics.jsonl'
    kept = path.read_bytes()
    path.write_bytes(kept[:len(kept.splitlines(keepends=True)[0]) + 20])  # the run record and a piece of the next
    proc = trained(tmp_path, corpus_dir, '--resume', 'model.pt.resume', epochs=2)
    assert 'model.pt.metrics.jsonl is missing or shorter than the' in proc.stdout
    kinds = [json.loads(line)['kind'] for line in path.read_text().splitlines()]
    assert kinds[0] == 'run' and kinds.count('run') == 1
    pytest.importorskip('matplotlib')
    assert run_script('plot.py', path, cwd=tmp_path).returncode == 0


def test_a_longer_metrics_file_of_another_run_is_not_continued(tmp_path, corpus_dir):
    trained(tmp_path, corpus_dir)
    resume = (tmp_path / 'model.pt.resume').read_bytes()
    trained(tmp_path, corpus_dir, '--lr', 3, epochs=3)  # another run on the same --save
    (tmp_path / 'model.pt.resume').write_bytes(resume)
    proc = trained(tmp_path, corpus_dir, '--resume', 'model.pt.resume', epochs=2)
    assert "holds another run's records" in proc.stdout, describe(proc)
    records = [json.loads(line) for line in (tmp_path / 'model.pt.metrics.jsonl').read_text().splitlines()]
    assert records[0]['kind'] == 'run' and records[0]['resumed'] and all(r.get('flags', {}).get('lr', 20) == 20
                                                                        for r in records)


# ---------------------------------------------------------------- 4. one sentence, not a traceback

def test_generate_refuses_a_checkpoint_of_nan_weights(tmp_path, corpus_dir):
    trained(tmp_path, corpus_dir)
    ckpt = torch.load(tmp_path / 'model.pt', weights_only=True)
    ckpt['model']['decoder.weight'].fill_(float('nan'))
    checkpoint.save(ckpt, str(tmp_path / 'nan.pt'))
    line = error_line(run_script('generate.py', '--checkpoint', 'nan.pt', '--words', 5, cwd=tmp_path), 'generate.py', 1)
    assert "its weight 'decoder.weight' holds inf or NaN values." in line


@pytest.mark.parametrize('what', ['checkpoint', 'png', 'missing keys', 'no batches'])
def test_plot_refuses_what_is_not_a_metrics_file(what, tmp_path, corpus_dir):
    pytest.importorskip('matplotlib')
    run = {'kind': 'run', 'recipe': 'fp32', 'flags': {}, 'device': 'cpu', 'batches_per_epoch': 0, 'elapsed': 0}
    content = {'checkpoint': None, 'png': b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00\xff\xfe\x00',
               'missing keys': (json.dumps({**run, 'batches_per_epoch': 2}) + '\n{"kind": "epoch"}\n').encode(),
               'no batches': (json.dumps(run) + '\n').encode()}[what]
    if content is None:
        trained(tmp_path, corpus_dir)
        os.replace(tmp_path / 'model.pt', tmp_path / 'bad')
    else:
        (tmp_path / 'bad').write_bytes(content)
    line = error_line(run_script('plot.py', 'bad', cwd=tmp_path), 'plot.py', 1)
    assert line.startswith('plot.py: error: bad ')


def test_grad_stats_refuses_a_bptt_longer_than_a_transformer_reads(tmp_path, corpus_dir):
    trained(tmp_path, corpus_dir, '--model', 'Transformer', '--nhead', 2)
    proc = run_script('grad_stats.py', '--checkpoint', 'model.pt', '--data', corpus_dir, '--bptt', 6000,
                      '--batch_size', 1, '--batches', 1, cwd=tmp_path)
    assert 'bptt 6000 (--bptt) must be at most' in error_line(proc, 'grad_stats.py', 2)


def test_the_size_check_reads_the_process_memory_limit(tmp_path, corpus_dir):
    limit = 8 * 2 ** 30  # above what importing torch maps, far below this model's 15 GiB

    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    env = dict(os.environ, **ENV, CUDA_VISIBLE_DEVICES='')
    proc = subprocess.run([sys.executable, str(REPO / 'main.py'), '--data', str(corpus_dir), '--emsize', '16000',
                           '--nhid', '16000', '--dry-run'], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120, preexec_fn=limited)
    assert 'more than the 8 GiB of this process (ulimit -v)' in error_line(proc, 'main.py', 2)


# ---------------------------------------------------------------- 5. signals and silent peers

def missing_rank_env(port, **more):
    return {'WORLD_SIZE': '2', 'RANK': '0', 'LOCAL_RANK': '0', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port),
            **more}


def wait_until_listening(port, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(('127.0.0.1', port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail('rank 0 never started waiting for the others')


@pytest.mark.slow
def test_sigterm_while_waiting_for_a_rank_that_never_comes(tmp_path, corpus_dir):
    port = free_port()
    proc = start(REPO / 'main.py', '--data', corpus_dir, *TINY, '--dry-run', cwd=tmp_path, env=missing_rank_env(port))
    wait_until_listening(port, proc)
    time.sleep(1)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    done = finish(proc, timeout=30)
    took = time.time() - sent
    line = error_line(done, 'main.py', 143)
    assert 'stopped by SIGTERM while waiting for the other ranks' in line and took < 15, (took, line)


@pytest.mark.slow
def test_a_rank_that_never_comes_is_reported_after_the_peer_timeout(tmp_path, corpus_dir):
    port = free_port()
    began = time.time()
    proc = start(REPO / 'main.py', '--data', corpus_dir, *TINY, '--dry-run', cwd=tmp_path,
                 env=missing_rank_env(port, WORD_LM_PEER_TIMEOUT='5'))
    done = finish(proc, timeout=60)
    line = error_line(done, 'main.py', 1)
    assert 'no answer for 5 s, WORD_LM_PEER_TIMEOUT' in line and time.time() - began < 45, line


@pytest.mark.slow
def test_a_stopped_rank_is_reported_within_the_peer_timeout(tmp_path, corpus_dir):
    torchrun = start('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', REPO / 'main.py',
                     '--data', corpus_dir, *TINY, '--epochs', 1000, '--log-interval', 1, cwd=tmp_path,
                     env={'WORD_LM_PEER_TIMEOUT': '8'})
    try:
        wait_for(torchrun, '| epoch', timeout=90)
        children = subprocess.run(['pgrep', '-P', str(torchrun.pid)], capture_output=True, text=True).stdout.split()
        rank1 = next(int(p) for p in children if 'RANK=1' in open(f'/proc/{p}/environ').read().split('\0'))
        os.kill(rank1, signal.SIGSTOP)
        stopped = time.time()
        seen = b''
        while b'lost contact' not in seen:
            assert time.time() - stopped < 40, seen
            if select.select([torchrun.stderr], [], [], 0.5)[0]:
                seen += os.read(torchrun.stderr.fileno(), 65536)
        assert b'rank 0 lost contact with the other ranks (Timed out: no answer for 8 s' in seen, seen
        os.kill(rank1, signal.SIGCONT)
    finally:
        torchrun.kill()
        finish(torchrun)


# ---------------------------------------------------------------- 7. smaller ones

def test_two_generate_runs_cannot_write_one_outf(tmp_path, corpus_dir):
    trained(tmp_path, corpus_dir)
    first = start(REPO / 'generate.py', '--checkpoint', 'model.pt', '--words', 10 ** 8, '--log-interval', 100,
                  cwd=tmp_path)
    try:
        wait_for(first, '| Generated')
        proc = run_script('generate.py', '--checkpoint', 'model.pt', '--words', 5, cwd=tmp_path)
        assert error_line(proc, 'generate.py', 2) == (
            f'generate.py: error: --outf generated.txt is in use by another run (process {first.pid}); '
            'wait for it to finish or give another --outf.')
    finally:
        first.kill()
        finish(first)


def test_a_fifo_as_a_data_file_is_not_called_missing(tmp_path):
    corpus = make_tiny_corpus(tmp_path / 'c')
    (corpus / 'test.txt').unlink()
    os.mkfifo(corpus / 'test.txt')
    line = error_line(train(tmp_path, corpus, '--dry-run'), 'main.py', 1)
    assert 'test.txt is not a regular file (a FIFO, device or socket)' in line


def test_a_directory_as_checkpoint_is_named_a_directory(tmp_path):
    (tmp_path / 'model.pt').mkdir()
    proc = run_script('generate.py', '--checkpoint', 'model.pt', cwd=tmp_path)
    line = error_line(proc, 'generate.py', 2)
    assert line == 'generate.py: error: --checkpoint model.pt is a directory; give a file.'


# ---------------------------------------------------------------- 8. the stderr rule, structural

def test_every_process_the_suite_starts_says_something_on_stderr(tmp_path, call_script):
    proc = run_script('generate.py', '--checkpoint', 'missing.pt', cwd=tmp_path)
    assert START_UP_LINE in proc.stderr
    child = subprocess.run([sys.executable, '-c', 'pass'], capture_output=True, text=True)
    assert START_UP_LINE in child.stderr
    assert START_UP_LINE in call_script('generate.py', '--checkpoint', 'missing.pt', cwd=tmp_path).stderr
