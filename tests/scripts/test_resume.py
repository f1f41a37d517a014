"""--resume end to end: a stopped and resumed run equals the uninterrupted one; runs it cannot continue are refused."""
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import training
from benchmarks import gpu_check
from conftest import (ADAMW_FLAGS, REPO, RESUME_CONFIGS, RESUME_RECIPES, SMALL, SPLITS, TINY_RUN, TRANSFORMER,
                      assert_unchanged, describe, end_line, error_line, header, progress_by_epoch, records, same,
                      snapshot, start_torchrun, torchrun)
from plumbing import checkpoint, signals

TIMINGS = {'elapsed', 'ms_per_batch', 'tokens_per_s', 'epoch_seconds'}  # differ from run to run


def weights_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def without_timings(recs):
    """The records but the run records, timings left out: what a resumed run must repeat exactly."""
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in recs if r['kind'] != 'run']


def run_lines(out):
    """The progress, skipped-update, end-of-epoch and test lines, timings blanked."""
    lines = [line for line in out.splitlines() if line.startswith(('| epoch', '| gradients', '| end of', '| End of'))]
    return [re.sub(r'(ms/batch|tok/s|eta|time:) +[\d.]+s?', r'\1 _', line) for line in lines]


@pytest.mark.parametrize('name', list(ADAMW_FLAGS))
def test_resume_continues_exactly_with_adamw(name, corpus_dir, tmp_path, call_script):
    """2 epochs in one go == 1 epoch, then --resume for the 2nd: same lines, same weights, same AdamW
    state. Dropout > 0, so the resumed run needs the saved RNG state too."""
    script, flags = ADAMW_FLAGS[name]
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


@pytest.mark.parametrize('saved, resumed', [([], ['--use-optimizer'])])
def test_resume_refuses_the_other_optimizer(saved, resumed, corpus_dir, tmp_path, call_script):
    proc = call_script('main.py', '--data', corpus_dir, *TINY_RUN, '--epochs', 1, *saved, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    proc = call_script('main.py', '--data', corpus_dir, *TINY_RUN, '--epochs', 2, *resumed,
                       '--resume', 'model.pt.resume', cwd=tmp_path)
    line = error_line(proc, 'main.py', 2)
    assert f'--use-optimizer was {bool(saved)}, now {bool(resumed)}' in line, line
    assert '| epoch' not in proc.stdout


def test_resume_continues_a_transformer_run_exactly(corpus_dir, tmp_path, call_script, monkeypatch):
    """2 epochs in one go == a run stopped by SIGINT after batch 12 of epoch 1, resumed (no hidden state: None),
    stopped at the end of epoch 1, resumed for epoch 2; dropout on, so the saved RNG state matters too."""
    common = ['--data', corpus_dir, *TRANSFORMER, '--dropout', 0.2]
    (tmp_path / 'full').mkdir()
    full = call_script('main.py', *common, '--epochs', 2, cwd=tmp_path / 'full')
    assert full.returncode == 0, describe(full)

    (tmp_path / 'split').mkdir()
    train_batch, batches = training.train_batch, []

    def interrupted_after_batch_12(*args):
        result = train_batch(*args)
        batches.append(1)
        if len(batches) == 12:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(training, 'train_batch', interrupted_after_batch_12)
    first = call_script('main.py', *common, '--epochs', 2, cwd=tmp_path / 'split')
    monkeypatch.setattr(training, 'train_batch', train_batch)
    assert first.returncode == 0 and 'Exiting from training early at epoch 1, batch 12' in first.stdout, describe(first)
    saved = checkpoint.load(str(tmp_path / 'split' / 'model.pt.resume'))['resume']['progress']
    assert (saved['epoch'], saved['next_batch'], saved['hidden']) == (1, 12, None)
    second = call_script('main.py', *common, '--epochs', 1, '--resume', 'model.pt.resume', cwd=tmp_path / 'split')
    third = call_script('main.py', *common, '--epochs', 2, '--resume', 'model.pt.resume', cwd=tmp_path / 'split')
    for proc in (second, third):
        assert proc.returncode == 0, describe(proc)
    assert progress_by_epoch(first.stdout + second.stdout)[1] == progress_by_epoch(full.stdout)[1]
    assert progress_by_epoch(third.stdout)[2] == progress_by_epoch(full.stdout)[2]
    assert end_line(third.stdout) == end_line(full.stdout)
    for name in ('model.pt', 'model.pt.resume'):
        assert weights_equal(checkpoint.load(str(tmp_path / 'full' / name))['model'],
                             checkpoint.load(str(tmp_path / 'split' / name))['model']), name


def test_rnn_run_saved_before_nhead_existed_still_resumes(corpus_dir, tmp_path, call_script):
    """--nhead is compared on resume only for the Transformer: an LSTM's SAVE.resume without it continues."""
    common = ['--data', corpus_dir, '--emsize', 16, '--nhid', 16, '--batch_size', 8, '--bptt', 10, '--lr', 5]
    assert call_script('main.py', *common, '--epochs', 1, cwd=tmp_path).returncode == 0
    ckpt = checkpoint.load(str(tmp_path / 'model.pt.resume'))
    del ckpt['args']['nhead']
    checkpoint.save(ckpt, str(tmp_path / 'model.pt.resume'))
    proc = call_script('main.py', *common, '--epochs', 2, '--nhead', 4, '--resume', 'model.pt.resume', cwd=tmp_path)
    assert proc.returncode == 0 and '| resuming model.pt.resume at epoch 2, batch 0' in proc.stdout, describe(proc)


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_resume_file_continues_only_with_as_many_processes(tmp_path, corpus_dir, call_script):
    assert torchrun('main.py', '--data', corpus_dir, *map(str, SMALL), '--epochs', '1', cwd=tmp_path).returncode == 0
    proc = call_script('main.py', '--data', corpus_dir, *SMALL, '--epochs', 2, '--resume', 'model.pt.resume',
                       cwd=tmp_path)
    line = error_line(proc, 'main.py', 2)
    assert line == ('main.py: error: cannot resume from model.pt.resume: it was saved by 2 process(es) and this '
                    'run has 1 (each continues its own random numbers); resume with 2.'), line


def second_signal_at(n):
    """A train_batch that raises the second Ctrl-C's exception at call n: the run dies at once, saving nothing."""
    real, calls = training.train_batch, []

    def train_batch(*args):
        calls.append(1)
        if len(calls) == n:
            raise signals.SecondSignal(signal.SIGINT)
        return real(*args)
    return train_batch


def sigint_after(n):
    """A train_batch that sends SIGINT after call n: the run stops after that batch and saves SAVE.resume."""
    real, calls = training.train_batch, []

    def train_batch(*args):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args)
    return train_batch


@pytest.mark.parametrize('how, exit_code', [
    ('stopped mid-epoch 2', 0),  # SAVE.resume at the stop; the stopped run's test record is dropped
    ('killed mid-epoch 2', 130),  # SAVE.resume from epoch 1's end; the records after it are written again
])
def test_a_resumed_run_has_the_records_of_one_never_stopped(how, exit_code, tmp_path, call_script, corpus_dir,
                                                            monkeypatch):
    flags = ['--data', corpus_dir, *SMALL, '--epochs', 3, '--fp16']
    (tmp_path / 'whole').mkdir()
    whole = call_script('main.py', *flags, cwd=tmp_path / 'whole')
    assert whole.returncode == 0, describe(whole)
    nbatches = records(tmp_path / 'whole')[0]['batches_per_epoch']

    train_batch = (sigint_after if how.startswith('stopped') else second_signal_at)(nbatches + 12)
    with monkeypatch.context() as m:
        m.setattr(training, 'train_batch', train_batch)
        first = call_script('main.py', *flags, cwd=tmp_path)
    assert first.returncode == exit_code, describe(first)
    before = records(tmp_path)
    assert any(r['kind'] == 'train' and r['epoch'] == 2 for r in before)  # records the resumed run writes again
    resumed = call_script('main.py', *flags, '--resume', 'model.pt.resume', cwd=tmp_path)
    assert resumed.returncode == 0, describe(resumed)

    recs = records(tmp_path)
    assert without_timings(recs) == without_timings(records(tmp_path / 'whole'))
    runs = [r for r in recs if r['kind'] == 'run']
    assert [r['resumed'] for r in runs] == [False, True]
    assert (runs[1]['epoch'], runs[1]['batch']) == ((2, 12) if how.startswith('stopped') else (2, 0))
    times = [r['elapsed'] for r in recs]
    assert times == sorted(times)  # the clock goes on from where SAVE.resume left it


def test_a_resume_without_the_metrics_file_starts_one_and_says_so(tmp_path, call_script, corpus_dir):
    flags = ['--data', corpus_dir, *SMALL, '--epochs', 2]
    assert call_script('main.py', *flags[:-1], 1, cwd=tmp_path).returncode == 0
    (tmp_path / 'model.pt.metrics.jsonl').unlink()
    proc = call_script('main.py', *flags, '--resume', 'model.pt.resume', cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert '| model.pt.metrics.jsonl is missing or shorter than the ' in proc.stdout
    recs = records(tmp_path)
    assert recs[0]['kind'] == 'run' and recs[0]['resumed'] is True and recs[0]['epoch'] == 2
    assert [r['epoch'] for r in recs if r['kind'] == 'epoch'] == [2]


def test_resume_refuses_flags_that_differ_and_takes_those_that_may(tmp_path, call_script, corpus_dir, stopped_run):
    """The documented rule: only --epochs, --save, --log-interval, --data, --cuda, --accel and --onnx-export
    may change."""
    for name in ('model.pt', 'model.pt.resume'):
        shutil.copy(stopped_run / name, tmp_path / name)
    resume = ['--resume', 'model.pt.resume', '--data', corpus_dir]
    proc = call_script('main.py', *SMALL, *resume, '--lr', 1, '--seed', 99, '--dropout', 0.5, cwd=tmp_path)
    line = error_line(proc, 'main.py', 2)
    assert line == ('main.py: error: cannot resume from model.pt.resume: --dropout was 0.2, now 0.5; '
                    '--lr was 5.0, now 1.0; --seed was 1111, now 99 (a resumed run continues the saved one '
                    'exactly: only --epochs, --save, --log-interval, --data, --cuda, --accel and --onnx-export '
                    'may change).'), line
    (tmp_path / 'elsewhere').mkdir()
    proc = call_script('main.py', *SMALL, *resume, '--epochs', 2, '--log-interval', 7, '--save', 'elsewhere/m.pt',
                       cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert '| resuming model.pt.resume at epoch 2' in proc.stdout
    assert (tmp_path / 'elsewhere' / 'm.pt.resume').exists()


# ---------------------------------------------------------------- a resumed run prints what an unstopped one does

@pytest.mark.parametrize('script, flags', [
    ('main.py', []),
    ('main.py', ['--fp16', '--static-loss-scale', '1e6']),  # skips updates before and after the stop
    ('main_fp16_optimizer.py', ['--fp16', '--dynamic-loss-scale']),
])
def test_a_run_resumed_mid_epoch_prints_the_lines_of_one_never_stopped(script, flags, tmp_path, call_script,
                                                                        corpus_dir, monkeypatch):
    """Stopped by SIGINT after batch 12 of epoch 1 (mid-line: a line every 5 batches), then resumed: the
    progress, skipped-update and end-of-epoch lines are those of the unstopped run, timings aside."""
    run = ['--data', corpus_dir, *SMALL, '--epochs', 1, *flags]
    (tmp_path / 'whole').mkdir()
    whole = call_script(script, *run, cwd=tmp_path / 'whole')
    assert whole.returncode == 0, describe(whole)
    if '1e6' in flags:
        skips = [line for line in whole.stdout.splitlines() if line.startswith('| gradients are not finite')]
        assert len(skips) >= 4 and '| skipped 0' not in whole.stdout, whole.stdout

    real_train_batch, calls = training.train_batch, []

    def train_batch(*args):
        calls.append(1)
        if len(calls) == 12:
            os.kill(os.getpid(), signal.SIGINT)  # StopRequest's handler: stop after this batch
        return real_train_batch(*args)

    with monkeypatch.context() as m:
        m.setattr(training, 'train_batch', train_batch)
        first = call_script(script, *run, cwd=tmp_path)
    assert first.returncode == 0 and 'Exiting from training early at epoch 1, batch 12;' in first.stdout, describe(first)
    second = call_script(script, *run, '--resume', 'model.pt.resume', cwd=tmp_path)
    assert second.returncode == 0, describe(second)
    stopped = [line for line in first.stdout.splitlines() if line.startswith(('| epoch', '| gradients'))]
    assert progress_by_epoch('\n'.join(stopped + [second.stdout])) == progress_by_epoch(whole.stdout)


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope='module')
def other_corpus_dir(tmp_path_factory, corpus_dir):
    """Same sizes and structure, other words: the vocabulary differs, the model's shapes do not."""
    d = tmp_path_factory.mktemp('other-corpus')
    for split in SPLITS:
        (d / f'{split}.txt').write_text((corpus_dir / f'{split}.txt').read_text().replace('w', 'v'))
    return d


# ---------------------------------------------------------------- --resume

@pytest.mark.parametrize('name', list(RESUME_CONFIGS))
def test_resume_continues_exactly(name, resume_runs):
    """2 epochs in one go == 1 epoch, then --resume for the 2nd: same losses, same test loss, same weights."""
    r = resume_runs(name)
    for proc in (r.full, r.first, r.second):
        assert proc.returncode == 0, describe(proc)
        assert 'Traceback' not in proc.stderr, describe(proc)
    resuming = '| resuming model.pt.resume at epoch 2, batch 0'
    assert resuming in r.second.stdout.splitlines(), r.second.stdout
    assert r.second.stdout.index(resuming) < r.second.stdout.index('| device ')  # said before the header
    recipe, precision = RESUME_RECIPES[name]
    assert precision in header(r.full.stdout), header(r.full.stdout)
    assert header(r.first.stdout) == header(r.second.stdout) == header(r.full.stdout)
    assert '| resuming' not in r.full.stdout + r.first.stdout
    full, first, second = (progress_by_epoch(p.stdout) for p in (r.full, r.first, r.second))
    assert sorted(full) == [1, 2] and sorted(first) == [1] and sorted(second) == [2], (full, first, second)
    assert sum(line.startswith('| epoch') for line in full[2]) >= 7, full[2]  # 38 batches, a line every 5
    assert second[2] == full[2]
    assert first[1] == full[1]
    assert end_line(r.second.stdout) == end_line(r.full.stdout)
    for name_ in ('model.pt', 'model.pt.resume'):
        a, b = checkpoint.load(str(r.full_dir / name_)), checkpoint.load(str(r.split_dir / name_))
        assert weights_equal(a['model'], b['model']), name_
    state = checkpoint.load(str(r.split_dir / 'model.pt.resume'))['resume']
    assert state['recipe'] == recipe
    progress = state['progress']
    assert (progress['epoch'], progress['next_batch'], progress['hidden']) == (3, 0, None), progress
    full_progress = checkpoint.load(str(r.full_dir / 'model.pt.resume'))['resume']['progress']
    assert progress['best_val_loss'] == full_progress['best_val_loss']
    assert progress['skipped'] == full_progress['skipped'] == r.full.stdout.count('| gradients are not finite')


RESUME_MISMATCHES = {
    # name: (run whose files are resumed, script, extra flags (the run's own included), --resume file,
    #        what the line must say)
    'nhid': ('main-fp32', 'main.py', ['--nhid', '32'], 'model.pt.resume', ['--nhid was 16, now 32']),
    'model': ('main-fp32', 'main.py', ['--model', 'GRU'], 'model.pt.resume', ['--model was LSTM, now GRU']),
    'vocabulary': ('main-fp32', 'main.py', ['--data', '{other_corpus}'], 'model.pt.resume', ['vocabulary differs']),
    'batch_size': ('main-fp32', 'main.py', ['--batch_size', '16'], 'model.pt.resume', ['--batch_size was 8, now 16']),
    'fp16-on-fp32-run': ('main-fp32', 'main.py', ['--fp16'], 'model.pt.resume', ['--fp16 was False, now True']),
    'fp16-optimizer-on-manual-fp16-run': ('main-fp16', 'main_fp16_optimizer.py', ['--fp16'], 'model.pt.resume',
                                          # the update steps differ, not any flag
                                          ['the precision recipe was fp16-manual, now fp16-optimizer-static.']),
    'manual-fp16-on-fp16-optimizer-run': ('fp16opt-dynamic', 'main.py', ['--fp16'], 'model.pt.resume',
                                          ['--dynamic-loss-scale was True, now False']),
    'amp-on-fp32-run': ('main-fp32', 'main.py', ['--amp'], 'model.pt.resume', ['--amp was False, now True']),
    'best-model-file': ('main-fp32', 'main.py', [], 'model.pt', ['best-model checkpoint', 'not a resume checkpoint']),
}


@pytest.mark.parametrize('name', list(RESUME_MISMATCHES))
def test_resume_refuses_a_run_it_cannot_continue(name, tmp_path, call_script, resume_runs, corpus_dir, other_corpus_dir):
    source, script, extra, resume_file, needles = RESUME_MISMATCHES[name]
    r = resume_runs(source)
    assert r.second.returncode == 0, describe(r.second)
    case = tmp_path / 'case'
    case.mkdir()
    for f in ('model.pt', 'model.pt.resume'):
        shutil.copy(r.split_dir / f, case / f)
    before = snapshot(tmp_path)
    extra = [str(a).format(other_corpus=other_corpus_dir) for a in extra]
    proc = call_script(script, '--data', corpus_dir, *SMALL, '--epochs', 5, *extra, '--resume', resume_file, cwd=case)
    line = error_line(proc, script, 2)
    assert resume_file in line, line
    if resume_file.endswith('.resume'):
        assert f'cannot resume from {resume_file}' in line, line
    for needle in needles:
        assert needle in line, line
    assert '| epoch' not in proc.stdout
    assert_unchanged(before, tmp_path)


def test_bf16_run_stopped_mid_epoch_resumes_exactly(corpus_dir, tmp_path):
    # Under --bf16 the RNN hands back a bf16 hidden state, which SAVE.resume keeps mid-epoch.
    flags = [sys.executable, str(REPO / 'main.py'), '--data', str(corpus_dir), '--bf16', '--emsize', '16', '--nhid', '16',
             '--batch_size', '8', '--bptt', '10', '--log-interval', '5', '--epochs', '6', '--save', 'model.pt']
    env = dict(os.environ, PYTHONUNBUFFERED='1', CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1')
    (tmp_path / 'once').mkdir()
    (tmp_path / 'stopped').mkdir()
    once = subprocess.Popen(flags, cwd=tmp_path / 'once', stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env)
    stopped = subprocess.Popen(flags, cwd=tmp_path / 'stopped', stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env)
    for line in stopped.stdout:
        if line.startswith('| epoch   2 |'):
            stopped.send_signal(signal.SIGTERM)
            break
    stopped.communicate(timeout=120)
    assert stopped.returncode == 143 and once.wait(timeout=120) == 0
    resumed = subprocess.run(flags + ['--resume', 'model.pt.resume'], cwd=tmp_path / 'stopped', capture_output=True,
                             text=True, env=env, timeout=120)
    assert resumed.returncode == 0 and 'Traceback' not in resumed.stdout + resumed.stderr, resumed.stderr
    assert '| resuming model.pt.resume at epoch 2, batch ' in resumed.stdout
    good, line = gpu_check.same(tmp_path / 'once' / 'model.pt.metrics.jsonl',
                                tmp_path / 'stopped' / 'model.pt.metrics.jsonl', 0)
    assert good, line
