"""What a run writes and what --resume takes: one run per --save (an OS lock), saves that fail
(one sentence saying what was lost, earlier files whole), every field of SAVE.resume and every
flag questioned before training, and a run resumed mid-epoch printing the lines of one never stopped."""
import errno
import os
import shutil
import signal
import subprocess

import pytest
import torch
from test_robustness import SMALL, finish, progress_by_epoch, read_until, start_training

import training
from conftest import ENV, describe, error_line, run_script, temp_files
from plumbing import checkpoint, session


def files_of(directory):
    """{name: bytes} of the files in directory."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


# ---------------------------------------------------------------- one run per --save

def test_one_run_per_save_and_a_killed_run_blocks_nothing(tmp_path, call_script, corpus_dir):
    """A second run on the same --save is refused, naming the first; once the first is killed (-9),
    the next run starts and removes the temporary files a killed run leaves, and only those."""
    first, watchdog = start_training(tmp_path, corpus_dir)
    seen = []
    try:
        assert read_until(first, '| epoch', seen), ''.join(seen)
        second = call_script('main.py', '--data', corpus_dir, *SMALL, '--epochs', 1, cwd=tmp_path)
        line = error_line(second, 'main.py', 2)
        assert line == (f'main.py: error: --save model.pt is in use by another run (process {first.pid}); '
                        f'wait for it to finish or give another --save.'), line
        assert '| epoch' not in second.stdout
    finally:
        first.kill()
        finish(first, watchdog, seen)
    stale = ['.model.pt.4321.0123abcd.tmp', '.model.pt.resume.77.deadbeef.tmp']
    others = ['.other.pt.4321.0123abcd.tmp', '.model.pt.notes.tmp', 'model.pt.4321.0123abcd.tmp']
    for name in stale + others:
        (tmp_path / name).write_bytes(b'a partial checkpoint')
    left = [n for n in temp_files(tmp_path) if n not in others]  # ours, and any the killed run was writing
    assert len(left) >= 2
    third = call_script('main.py', '--data', corpus_dir, *SMALL, '--epochs', 1, cwd=tmp_path)
    assert third.returncode == 0, describe(third)
    assert f'| removed {len(left)} temporary file(s) that a killed run left beside model.pt' in third.stdout
    assert sorted(temp_files(tmp_path)) == sorted(n for n in others if n.startswith('.'))
    assert (tmp_path / others[2]).exists()
    assert not (tmp_path / '.model.pt.lock').exists()  # removed when the run ends
    checkpoint.load(str(tmp_path / 'model.pt'))


# ---------------------------------------------------------------- saves that fail

def full_disk_on_call(n):
    """A torch.save that fails as it does on a full disk (an OSError inside torch's RuntimeError) on its n-th call."""
    real_save, calls = torch.save, []

    def save(obj, f):
        calls.append(1)
        if len(calls) != n:
            return real_save(obj, f)
        f.write(b'the start of a checkpoint')
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError('[enforce fail at inline_container.cc] unexpected pos')
    return save


@pytest.mark.parametrize('failing, lost', [
    (1, 'the epoch 1 model (valid loss {valid}) is lost'),
    (2, '--resume can continue only from an earlier SAVE.resume'),
])
def test_a_failed_save_is_one_sentence_and_keeps_the_files(failing, lost, tmp_path, call_script, corpus_dir,
                                                           monkeypatch):
    """Save 1 is epoch 1's best model, save 2 its SAVE.resume: either failing stops the run with the
    operating system's reason and what was lost, and leaves the files of an earlier run as they were."""
    (tmp_path / 'model.pt').write_bytes(b'an earlier best model')
    (tmp_path / 'model.pt.resume').write_bytes(b'an earlier resume file')
    before = files_of(tmp_path)
    monkeypatch.setattr(checkpoint.torch, 'save', full_disk_on_call(failing))
    proc = call_script('main.py', '--data', corpus_dir, *SMALL, '--epochs', 2, cwd=tmp_path)
    line = error_line(proc, 'main.py', 1)
    valid = proc.stdout.split('| valid loss')[1].split()[0]
    path = 'model.pt' if failing == 1 else 'model.pt.resume'
    assert line == (f'main.py: error: could not write {path} (No space left on device); '
                    f'{lost.format(valid=valid)} (files saved before are unchanged).'), line
    after = files_of(tmp_path)
    assert after.pop('model.pt.metrics.jsonl')  # the run's own log
    if failing == 2:  # the best model was written before
        assert checkpoint.load(str(tmp_path / 'model.pt'))['best_val_loss'] == pytest.approx(float(valid), abs=0.006)
        del before['model.pt'], after['model.pt']
    assert after == before
    assert 'End of training' not in proc.stdout


def test_a_name_too_long_or_a_file_not_writable_is_refused_before_training(tmp_path, call_script, corpus_dir):
    name_max = os.pathconf(tmp_path, 'PC_NAME_MAX')
    proc = call_script('main.py', '--data', corpus_dir, *SMALL[:-2], '--save', 'm' * (name_max - 10), cwd=tmp_path)
    line = error_line(proc, 'main.py', 2)
    assert 'the name is too long for the file system' in line, line
    assert '| device' not in proc.stdout

    locked = tmp_path / 'model.pt'
    locked.write_bytes(b'keep me')
    if os.geteuid() == 0:  # root writes read-only files; an immutable one it cannot
        if subprocess.run(['chattr', '+i', str(locked)], capture_output=True).returncode:
            pytest.skip('chattr +i is not available here')
    else:
        locked.chmod(0o444)
    try:
        proc = call_script('main.py', '--data', corpus_dir, *SMALL, cwd=tmp_path)
    finally:
        subprocess.run(['chattr', '-i', str(locked)], capture_output=True)
    line = error_line(proc, 'main.py', 2)
    assert line.endswith('--save model.pt is not writable (read-only or immutable); make it writable or give another name.')
    assert locked.read_bytes() == b'keep me'


# ---------------------------------------------------------------- --resume questions every field and flag

@pytest.fixture(scope='module')
def stopped_run(tmp_path_factory, corpus_dir):
    """A run stopped by SIGINT in epoch 2: its directory (model.pt, model.pt.resume) and output."""
    directory = tmp_path_factory.mktemp('stopped-run')
    proc, watchdog = start_training(directory, corpus_dir)
    seen = []
    try:
        assert read_until(proc, '| end of epoch   1', seen), ''.join(seen)
        assert read_until(proc, '| epoch   2', seen), ''.join(seen)
        proc.send_signal(signal.SIGINT)
    finally:
        done = finish(proc, watchdog, seen)
    assert done.returncode == 0, describe(done)
    progress = checkpoint.load(str(directory / 'model.pt.resume'))['resume']['progress']
    assert progress['epoch'] == 2 and progress['next_batch'] > 0, progress
    return directory


def tamper(path, change):
    ckpt = checkpoint.load(str(path))
    change(ckpt['resume'])
    torch.save(ckpt, path)


TAMPERED = {  # what is changed in SAVE.resume's 'resume' dict: the line names the field
    'epoch': lambda r: r['progress'].update(epoch=-1),
    'next_batch': lambda r: r['progress'].update(next_batch=10 ** 12),
    'best_val_loss': lambda r: r['progress'].update(best_val_loss='low'),
    'hidden': lambda r: r['progress'].update(hidden=tuple(h[:, :1] for h in r['progress']['hidden'])),
    'skipped': lambda r: r['progress'].update(skipped=True),
    'line_seconds': lambda r: r['progress'].update(line_seconds=float('nan')),
    'rng': lambda r: r.update(rng='seed'),
    'recipe_state': lambda r: r.update(recipe_state={'optimizer': []}),
}


@pytest.mark.parametrize('field', list(TAMPERED))
def test_resume_refuses_a_tampered_field_before_training(field, tmp_path, call_script, corpus_dir, stopped_run):
    shutil.copy(stopped_run / 'model.pt.resume', tmp_path / 'model.pt.resume')
    tamper(tmp_path / 'model.pt.resume', TAMPERED[field])
    proc = call_script('main.py', '--data', corpus_dir, *SMALL, '--epochs', 2, '--resume', 'model.pt.resume',
                       cwd=tmp_path)
    line = error_line(proc, 'main.py', 1)
    assert line.startswith(f'main.py: error: model.pt.resume is damaged or incompatible: '), line
    if field in {*session.Progress.__dataclass_fields__, *session.Line.__dataclass_fields__}:
        assert f'its progress field {field} is ' in line, line
    assert '| epoch' not in proc.stdout


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
