"""Bad flags, paths, corpora and saves: one 'SCRIPT: error: ' sentence, its exit code, nothing written."""
import errno
import os
import re
import shutil
import stat
import subprocess

import pytest
import torch

from conftest import (SMALL, SPLITS, TRAIN_ARGS, TRANSFORMER, assert_clean_error, assert_unchanged, describe,
                      error_line, run_real, snapshot)
from plumbing import checkpoint


@pytest.mark.parametrize('script', ['main.py', 'main_fp16_optimizer.py'])
@pytest.mark.parametrize('flags', [['--fp16', '--amp'], ['--amp', '--bf16'], ['--fp16', '--bf16']])
def test_conflicting_precision_flags(flags, script, tmp_path, call_script):
    proc = call_script(script, *flags, cwd=tmp_path)
    line = error_line(proc, script, 2)
    assert re.fullmatch(rf'{script}: error: argument --\w+: not allowed with argument --\w+; see {script} -h\.', line), line
    assert set(re.findall(r'--\w+', line)) == set(flags), line
    assert list(tmp_path.iterdir()) == []


def test_missing_accelerator_runs_on_the_cpu_with_a_note(corpus_dir, tmp_path, call_script):
    """call_script hides accelerators, as run_script does: --accel runs on the CPU and says so in one line."""
    for script, extra in (('main.py', ['--data', corpus_dir, '--emsize', 16, '--nhid', 16, '--dry-run', '--epochs', 1]),
                          ('main_fp16_optimizer.py', ['--data', corpus_dir, '--emsize', 16, '--nhid', 16, '--dry-run',
                                                      '--epochs', 1]),
                          ('generate.py', ['--checkpoint', 'model.pt', '--words', 3])):
        proc = call_script(script, '--accel', *extra, cwd=tmp_path)
        assert proc.returncode == 0, describe(proc)
        note = '| --accel: torch.accelerator finds no accelerator (CUDA, MPS, XPU, ...), so this runs on the CPU'
        assert proc.stdout.splitlines().count(note) == 1, proc.stdout


@pytest.mark.parametrize('flags, message', [
    (['--emsize', 16, '--nhead', 3], '--emsize 16 must be a multiple of --nhead 3 with --model Transformer.'),
    (['--nhead', 0], '--nhead must be at least 1 (got 0).'),
    (['--bptt', 5001], '--bptt must be at most 5000 with --model Transformer (got 5001).'),
])
def test_transformer_flags_are_checked(flags, message, corpus_dir, tmp_path, call_script):
    proc = call_script('main.py', '--data', corpus_dir, *TRANSFORMER, *flags, cwd=tmp_path)
    assert error_line(proc, 'main.py', 2) == f'main.py: error: {message}'
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- bad input to the training scripts

def test_main_missing_data_dir(tmp_path, call_script):
    missing = tmp_path / 'no-such-dir'
    proc = call_script('main.py', '--data', missing, *TRAIN_ARGS, cwd=tmp_path)
    assert_clean_error(proc, 'main.py', 2, f'--data {missing}: no such directory.')
    assert not (tmp_path / 'model.pt').exists()


def test_main_cuda_without_cuda(tmp_path, call_script, corpus_dir):
    proc = call_script('main.py', '--data', corpus_dir, *TRAIN_ARGS, '--cuda', cwd=tmp_path)
    assert_clean_error(proc, 'main.py', 2, '--cuda was given but no CUDA device is available.')
    assert not (tmp_path / 'model.pt').exists()


def files_of(directory):
    """{name: bytes} of the files in directory."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


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


# ---------------------------------------------------------------- bad flags fail fast

BAD_TRAINING_FLAGS = [  # (flag, value); the error line must show the value as given
    ('--emsize', '0'), ('--emsize', '-16'), ('--nhid', '0'), ('--nhid', '-1'), ('--nlayers', '0'), ('--nlayers', '-2'),
    ('--epochs', '0'), ('--epochs', '-3'), ('--batch_size', '0'), ('--batch_size', '-8'), ('--bptt', '0'),
    ('--bptt', '-10'), ('--log-interval', '0'), ('--log-interval', '-5'),
    ('--dropout', '-0.1'), ('--dropout', '1'), ('--dropout', '1.5'), ('--dropout', 'nan'),
    ('--lr', '0'), ('--lr', '-1'), ('--lr', 'nan'), ('--lr', 'inf'),
    ('--clip', '0'), ('--clip', '-0.25'), ('--clip', 'nan'),
    ('--static-loss-scale', '0'), ('--static-loss-scale', '-128'), ('--static-loss-scale', 'nan'),
    ('--model', 'lstm'), ('--model', 'TRANSFORMER'), ('--nhead', '0'),
    ('--batch_size', '2000'), ('--batch_size', '1000000'),  # more columns than the ~3000 train tokens allow
    ('--seed', str(2 ** 70)), ('--seed', str(-2 ** 63 - 1)),  # outside what torch's generators take
    ('--emsize', '100000000000'), ('--nhid', '1000000'),  # weights larger than the machine's memory
]

BAD_TRAINING_PATHS = [  # (flag, value); {corpus} is the good corpus directory
    ('--data', 'no-such-dir'), ('--data', '{corpus}/train.txt'), ('--data', ''),
    ('--save', 'somedir'), ('--save', 'no-such-dir/model.pt'), ('--save', 'model.pt/inside.pt'), ('--save', ''),
    ('--resume', 'no-such.pt.resume'), ('--resume', 'somedir'), ('--resume', ''),
]

TRAINING_SCRIPTS = {'main.py': [], 'main_fp16_optimizer.py': ['--fp16']}


def check_bad_flag(call_script, script, base, flag, value, case_dir, extra=()):
    root = case_dir.parent
    before = snapshot(root)
    proc = call_script(script, *base, *extra, flag, value, cwd=case_dir)
    line = error_line(proc, script, 2)
    assert flag in line, line
    assert value in line, line
    assert '| device' not in proc.stdout and '| epoch' not in proc.stdout  # nothing started
    assert_unchanged(before, root)  # the --save file is whole, no SAVE.resume, no temporary file
    return line


@pytest.mark.parametrize('script', list(TRAINING_SCRIPTS))
@pytest.mark.parametrize('flag, value', BAD_TRAINING_FLAGS + BAD_TRAINING_PATHS,
                         ids=[f'{f}={v}' for f, v in BAD_TRAINING_FLAGS + BAD_TRAINING_PATHS])
def test_bad_training_flag(script, flag, value, call_script, corpus_dir, case_dir):
    value = value.format(corpus=corpus_dir)
    base = ['--data', corpus_dir, *SMALL, '--epochs', 1, *TRAINING_SCRIPTS[script]]
    check_bad_flag(call_script, script, base, flag, value, case_dir)


def test_tied_needs_equal_sizes(call_script, corpus_dir, case_dir):
    base = ['--data', corpus_dir, *SMALL, '--epochs', 1]
    line = check_bad_flag(call_script, 'main.py', base, '--nhid', '32', case_dir, extra=['--tied'])
    assert '--tied' in line and 'emsize 16' in line and 'nhid 32' in line, line


def argparse_error(call_script, capsys, script, *args, cwd):
    """Run a command line that argparse itself rejects: one error line (no usage block), exit code 2."""
    proc = call_script(script, *args, cwd=cwd)
    assert 'usage:' not in proc.stderr, describe(proc)
    return proc


@pytest.mark.parametrize('script', list(TRAINING_SCRIPTS))
@pytest.mark.parametrize('flag, value', [('--emsize', 'abc'), ('--lr', 'fast'), ('--epochs', '2.5'), ('--dropout', '')])
def test_training_flag_not_a_number(flag, value, script, call_script, capsys, corpus_dir, case_dir):
    """argparse's own type errors: a usage line, then one line naming the flag and the value."""
    before = snapshot(case_dir.parent)
    proc = argparse_error(call_script, capsys, script, '--data', corpus_dir, *SMALL, flag, value, cwd=case_dir)
    line = error_line(proc, script, 2)
    assert line == f"{script}: error: argument {flag}: invalid " \
        f"{'int' if flag == '--epochs' or flag == '--emsize' else 'float'} value: '{value}'; see {script} -h."
    assert '| device' not in proc.stdout
    assert_unchanged(before, case_dir.parent)


BAD_GENERATE_FLAGS = [
    ('--temperature', '0'), ('--temperature', '-1'), ('--temperature', 'nan'),
    ('--words', '-1'), ('--log-interval', '0'), ('--log-interval', '-1'),
    ('--outf', 'no-such-dir/out.txt'), ('--outf', 'somedir'), ('--outf', ''),
    ('--checkpoint', 'no-such-model.pt'), ('--checkpoint', 'somedir'),
    ('--seed', str(2 ** 70)),
    ('--outf', 'model.pt'),  # the checkpoint it reads
]


@pytest.mark.parametrize('flag, value', BAD_GENERATE_FLAGS, ids=[f'{f}={v}' for f, v in BAD_GENERATE_FLAGS])
def test_bad_generate_flag(flag, value, call_script, case_dir):
    (case_dir / 'out.txt').write_text('earlier output\n')
    base = ['--checkpoint', 'model.pt', '--outf', 'out.txt', '--words', 30, '--log-interval', 10]
    check_bad_flag(call_script, 'generate.py', base, flag, value, case_dir)


def make_output_path(kind, case_dir, name, input_flag):
    """case_dir/name as something a script must not write through; returns its path as given."""
    path = case_dir / name
    if kind == 'symlink':
        (case_dir / 'target.txt').write_text('the link target\n')
        path.symlink_to(case_dir / 'target.txt')
    elif kind == 'dangling-symlink':
        path.symlink_to(case_dir / 'no-such-target')
    elif kind == 'fifo':
        os.mkfifo(path)
    elif kind == 'directory':
        path.mkdir()
    elif kind == 'device':  # a node of its own, like /dev/null (never the real one: a broken defence would replace it)
        try:
            os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        except PermissionError:
            pytest.skip('creating a device node needs root')
    elif kind == 'hard-link-to-input':  # the training data for the training scripts, the checkpoint for generate.py
        os.link(case_dir / ('model.pt' if input_flag == '--checkpoint' else 'data/train.txt'), path)
    return name


OUTPUT_KINDS = {  # kind: what the sentence says
    'symlink': 'is a symbolic link', 'dangling-symlink': 'is a symbolic link', 'fifo': 'is not a regular file',
    'device': 'is not a regular file', 'directory': 'is a directory', 'hard-link-to-input': 'is the same file as {input_flag}',
}


@pytest.mark.parametrize('kind', list(OUTPUT_KINDS))
@pytest.mark.parametrize('output', ['--save', 'SAVE.resume', '--outf'])
def test_output_is_a_regular_file_and_not_an_input(output, kind, call_script, corpus_dir, case_dir):
    """An output path is written only if it is a regular file or a new name, and is none of the run's inputs
    (compared as files: a hard link under another name is caught); anything else is refused untouched."""
    shutil.copytree(corpus_dir, case_dir / 'data')
    input_flag = '--checkpoint' if output == '--outf' else '--data'
    name = make_output_path(kind, case_dir, 'out.pt.resume' if output == 'SAVE.resume' else 'out.pt', input_flag)
    before = snapshot(case_dir.parent)
    if output == '--outf':
        proc = call_script('generate.py', '--checkpoint', 'model.pt', '--outf', name, '--words', 5, cwd=case_dir)
        script = 'generate.py'
    else:
        save = 'out.pt' if output == 'SAVE.resume' else name
        proc = call_script('main.py', '--data', 'data', *SMALL, '--epochs', 1, '--save', save, cwd=case_dir)
        script = 'main.py'
    line = error_line(proc, script, 2)
    assert f'{output} {name}' in line and OUTPUT_KINDS[kind].format(input_flag=input_flag) in line, line
    assert '| device' not in proc.stdout
    assert_unchanged(before, case_dir.parent)
    if kind in ('fifo', 'device'):
        assert not (case_dir / name).is_file()  # still the FIFO or the device node


@pytest.mark.parametrize('flag, value', [('--words', 'many'), ('--temperature', 'hot'), ('--seed', '1.5')])
def test_generate_flag_not_a_number(flag, value, call_script, capsys, case_dir):
    (case_dir / 'out.txt').write_text('earlier output\n')
    before = snapshot(case_dir.parent)
    proc = argparse_error(call_script, capsys, 'generate.py', '--outf', 'out.txt', flag, value, cwd=case_dir)
    line = error_line(proc, 'generate.py', 2)
    assert line == f"generate.py: error: argument {flag}: invalid " \
        f"{'float' if flag == '--temperature' else 'int'} value: '{value}'; see generate.py -h."
    assert_unchanged(before, case_dir.parent)


# ---------------------------------------------------------------- corpora that cannot be used

FAR = 22500  # offset of the bad byte in 'not-utf8-far': beyond the first 8 KiB the decoder reads


def write_bad_corpus(kind, directory, good):
    """A copy of the good corpus in directory, spoilt; returns the extra flags the case needs."""
    texts = {s: (good / f'{s}.txt').read_bytes() for s in SPLITS}
    extra = []
    if kind == 'empty-train':
        texts['train'] = b''
    elif kind == 'empty-valid':
        texts['valid'] = b''
    elif kind == 'train-too-short-for-batch':
        texts['train'] = b' '.join(b'w%d' % i for i in range(19)) + b'\n'  # 19 words + <eos> = 20 tokens
        extra = ['--batch_size', '16']
    elif kind == 'valid-too-short':
        texts['valid'] = b'w1 w2 w3 w4\n'  # 5 tokens
    elif kind == 'nul-bytes':
        texts['train'] = texts['train'][:200] + b'\x00\x00\x00' + texts['train'][200:]
    elif kind == 'not-utf8':
        texts['test'] = b'w1 w2\nw3 \xff\xfe w4\n'
    elif kind == 'not-utf8-far':
        texts['valid'] = b'w1 w2 w3\n' * (FAR // 9) + b'\xff w5\n'  # 9-byte lines, then the bad byte
    elif kind == 'train-is-a-directory':
        del texts['train']
    elif kind == 'missing-valid':
        del texts['valid']
    else:
        raise ValueError(kind)
    directory.mkdir()
    for split, blob in texts.items():
        (directory / f'{split}.txt').write_bytes(blob)
    if kind == 'train-is-a-directory':
        (directory / 'train.txt').mkdir()
        (directory / 'train.txt' / 'part1.txt').write_bytes((good / 'train.txt').read_bytes())
    return extra


BAD_CORPORA = {  # kind: (exit code, file named, what else the line must say)
    'empty-train': (1, 'train', ['no tokens']),
    'empty-valid': (1, 'valid', ['no tokens']),
    'train-too-short-for-batch': (2, 'train', ['--batch_size 16', '20 tokens']),
    'valid-too-short': (1, 'valid', ['5 tokens']),
    'nul-bytes': (1, 'train', ['NUL']),
    'not-utf8': (1, 'test', ['UTF-8']),
    'not-utf8-far': (1, 'valid', ['UTF-8', f'offset {FAR}']),
    'train-is-a-directory': (1, 'train', []),
    'missing-valid': (1, 'valid', ['missing']),
}


@pytest.mark.parametrize('script', list(TRAINING_SCRIPTS))
@pytest.mark.parametrize('kind', list(BAD_CORPORA))
def test_unusable_corpus(kind, script, tmp_path, call_script, corpus_dir, case_dir):
    rc, split, needles = BAD_CORPORA[kind]
    bad = tmp_path / 'bad-data'
    extra = write_bad_corpus(kind, bad, corpus_dir)
    before = snapshot(tmp_path)
    proc = call_script(script, '--data', bad, *SMALL, '--epochs', 1, *TRAINING_SCRIPTS[script], *extra, cwd=case_dir)
    line = error_line(proc, script, rc)
    assert str(bad / f'{split}.txt') in line, line
    for needle in needles:
        assert needle in line, line
    assert '| epoch' not in proc.stdout
    assert_unchanged(before, tmp_path)


# ---------------------------------------------------------------- divergence

DIVERGING = {
    # lr 1e38 with no clipping: the gradients become inf/NaN within the first 5 batches
    'non-finite-gradients': ['--lr', '1e38', '--clip', '1e30'],
    # lr 1e38 clipped to norm 0.25: from batch 2 on the training loss is inf (the logits overflow)
    # while the gradients (softmax - one-hot) stay finite
    'non-finite-loss': ['--lr', '1e38', '--clip', '0.25'],
}


@pytest.mark.parametrize('name', list(DIVERGING))
def test_diverging_fp32_run_stops(name, tmp_path, call_script, corpus_dir, case_dir):
    """The run stops in epoch 1 with 'training diverged'; the model.pt of an earlier run is untouched."""
    before = snapshot(tmp_path)
    proc = call_script('main.py', '--data', corpus_dir, *SMALL, '--epochs', 2, *DIVERGING[name], cwd=case_dir)
    line = error_line(proc, 'main.py', 1)
    assert line == ('main.py: error: training diverged: the loss or the gradients became inf or NaN in epoch 1 '
                    'with lr 1e+38 (try a smaller --lr); no model was saved.'), line
    assert '| device cpu | precision fp32' in proc.stdout  # it did train
    assert '| end of epoch' not in proc.stdout
    assert_unchanged(before, tmp_path, written=['case/model.pt.metrics.jsonl'])


REAL_ERROR_CASES = {
    # name: (script, arguments ({corpus}: the good corpus, {bad}: one whose test.txt is not UTF-8),
    #        exit code, a regular expression the error line must match)
    'main-flag': ('main.py', ['--data', '{corpus}', *SMALL, '--lr', '-1'], 2,
                  r'--lr must be a positive number \(got -1\)\.$'),
    'main-argparse': ('main.py', ['--data', '{corpus}', *SMALL, '--emsize', 'abc'], 2,
                      r"argument --emsize: invalid int value: 'abc'; see main\.py -h\.$"),
    'main-cuda': ('main.py', ['--data', '{corpus}', *SMALL, '--cuda'], 2,
                  r'--cuda was given but no CUDA device is available\.$'),
    'main-resume-best-model': ('main.py', ['--data', '{corpus}', *SMALL, '--resume', 'model.pt'], 2,
                               r'model\.pt is a best-model checkpoint, not a resume checkpoint'),
    'fp16opt-corpus': ('main_fp16_optimizer.py', ['--data', '{bad}', *SMALL, '--fp16'], 1,
                       r'bad-data/test\.txt is not UTF-8 text \(bad byte at offset 9\)\.$'),
    'fp16opt-flag': ('main_fp16_optimizer.py', ['--data', '{corpus}', *SMALL, '--fp16', '--static-loss-scale', '0'], 2,
                     r'--static-loss-scale must be a positive number \(got 0\)\.$'),
    'generate-checkpoint': ('generate.py', ['--checkpoint', 'notes.txt', '--outf', 'out.txt'], 1,
                            r'notes\.txt is (truncated, )?corrupt or not a PyTorch checkpoint\.$'),
    'generate-flag': ('generate.py', ['--temperature', '0', '--outf', 'out.txt'], 2,
                      r'--temperature must be a finite number of at least 1e-3 \(got 0\)\.$'),
}


@pytest.mark.parametrize('name, noisy', [(name, False) for name in REAL_ERROR_CASES]
                         + [('main-flag', True), ('fp16opt-corpus', True), ('generate-checkpoint', True)])
def test_real_script_error_path(name, noisy, tmp_path, call_script, capsys, corpus_dir, case_dir, noisy_env):
    """The script run as a process: its exit code, its one 'SCRIPT: error: ' line and no traceback,
    whatever else Python prints at start-up; the same code and line as cli.run in this process."""
    script, args, rc, pattern = REAL_ERROR_CASES[name]
    write_bad_corpus('not-utf8', tmp_path / 'bad-data', corpus_dir)
    (case_dir / 'notes.txt').write_text('not a checkpoint\n')
    args = [str(a).format(corpus=corpus_dir, bad=tmp_path / 'bad-data') for a in args]
    before = snapshot(tmp_path)
    real = run_real(script, args, case_dir, noisy_env, noisy)
    line = error_line(real, script, rc)
    assert re.search(pattern, line), line
    assert '| epoch' not in real.stdout
    assert_unchanged(before, tmp_path)
    if name.endswith('argparse'):
        here = argparse_error(call_script, capsys, script, *args, cwd=case_dir)
    else:
        here = call_script(script, *args, cwd=case_dir)
    assert error_line(here, script, rc) == line
    assert_unchanged(before, tmp_path)
