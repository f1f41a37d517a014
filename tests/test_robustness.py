"""Robustness of main.py, main_fp16_optimizer.py and generate.py.

- bad flag values and paths fail fast: one 'SCRIPT: error: ' line on stderr naming the flag and
  the value, exit 2, no traceback, nothing written and the existing --save file untouched;
- --resume continues a run exactly (fp32, manual fp16, FP16_Optimizer with a dynamic scale)
  and refuses, without touching anything, a run it cannot continue;
- SIGINT / SIGTERM stop after the current batch and leave SAVE.resume; a second signal quits
  at once and leaves only whole files;
- an fp32 run whose gradients become non-finite stops with 'training diverged';
- checkpoints that would run code, are truncated, corrupt, foreign or inconsistent are refused
  with one clear line, by generate.py and by --resume;
- corpora that cannot be used are refused with one clear line naming the file;
- the same seed and flags print the same losses.

The error cases run in this process: conftest's call_script calls cli.guarded_main(SCRIPT.main, ARGS) in
the case's directory, which is what `python SCRIPT ARGS` runs, so a case costs milliseconds
instead of a torch import. test_real_script_error_path checks that real processes fail the same
way (also with a package printing warnings at start-up). Training runs, --resume runs and
signals use real processes.
"""
import json
import os
import random
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ENV, REPO, describe, error_line, run_script, structured_text, temp_files
from plumbing import checkpoint

SPLITS = ('train', 'valid', 'test')

# A tiny model; dropout > 0 so that exact resumption needs the RNG state too.
SMALL = ['--emsize', 16, '--nhid', 16, '--batch_size', 8, '--bptt', 10, '--log-interval', 5,
         '--lr', 5, '--dropout', 0.2, '--save', 'model.pt']

END_RE = re.compile(r'\| End of training \| test loss +\S+ \| test ppl +\S+')
TIMING_RE = re.compile(r'(ms/batch|tok/s|eta|time:) +[\d.]+s?')


# ---------------------------------------------------------------- helpers

def snapshot(root):
    """Every file (its bytes) and directory under root."""
    root = Path(root)
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else 'dir') for p in sorted(root.rglob('*'))}


def assert_unchanged(before, root, written=()):
    """Nothing under root changed but the files named in written, which the run wrote (its metrics)."""
    after = snapshot(root)
    for name in written:
        assert after.pop(name), name
    assert sorted(after) == sorted(before), 'files appeared or vanished'
    changed = [name for name in before if before[name] != after[name]]
    assert not changed, f'changed: {changed}'


def assert_whole_json_lines(path):
    """A metrics file: every line a whole JSON record."""
    text = Path(path).read_text()
    assert text.endswith('\n')
    for line in text.splitlines():
        json.loads(line)


def normalized(line):
    return TIMING_RE.sub(r'\1 _', line.rstrip())


def progress_by_epoch(out):
    """{epoch: the periodic, skipped-update and end-of-epoch lines of that epoch, timings blanked}."""
    epochs, pending = {}, []
    for line in out.splitlines():
        if line.startswith(('| epoch ', '| gradients are not finite')):
            pending.append(normalized(line))
        elif m := re.match(r'\| end of epoch +(\d+) \|', line):
            epochs[int(m.group(1))] = pending + [normalized(line)]
            pending = []
    assert not pending, pending
    return epochs


def header(out):
    """The run's header line: device, precision, vocabulary, train tokens."""
    lines = [line for line in out.splitlines() if line.startswith('| device ')]
    assert len(lines) == 1, out
    assert re.fullmatch(r'\| device cpu \| precision .+ \| vocabulary \d+ \| train tokens \d+', lines[0]), lines[0]
    return lines[0]


def end_line(out):
    m = END_RE.search(out)
    assert m, out
    return m.group(0)


def weights_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class CodeOnLoad:
    """Unpickling this calls fn(*args): what a malicious checkpoint does."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def write_code_payload(kind, dest, marker):
    fn, args = (os.system, (f'touch {shlex.quote(str(marker))}',)) if kind == 'code-system' else (open, (str(marker), 'w'))
    torch.save({'format': checkpoint.FORMAT, 'model': CodeOnLoad(fn, args)}, dest)


def write_bad_checkpoint(kind, base, dest, marker):
    """A checkpoint at dest that cannot be used, made from the good one at base."""
    if kind.startswith('code-'):
        write_code_payload(kind, dest, marker)
    elif kind == 'truncated':
        blob = base.read_bytes()
        dest.write_bytes(blob[:len(blob) // 2])
    elif kind == 'corrupt':
        blob = bytearray(base.read_bytes())
        mid = len(blob) // 2
        for i in range(mid, mid + 64):
            blob[i] ^= 0xFF
        dest.write_bytes(bytes(blob))
    elif kind == 'text':
        dest.write_text('this is a text file, not a checkpoint\n')
    elif kind == 'plain-dict':
        torch.save({'model': {}, 'vocab': {'idx2word': []}}, dest)
    else:
        ckpt = checkpoint.load(str(base))
        if kind == 'weights-mismatch':
            w = ckpt['model']['encoder.weight']
            ckpt['model']['encoder.weight'] = torch.zeros(w.shape[0] + 8, w.shape[1], dtype=w.dtype)
        elif kind == 'missing-weight':
            del ckpt['model']['decoder.bias']
        elif kind == 'model-args-mismatch':
            ckpt['model_args']['nhid'] *= 2
        elif kind == 'missing-vocab':
            del ckpt['vocab']
        elif kind == 'weights-not-a-dict':
            ckpt['model'] = [1, 2, 3]
        else:
            raise ValueError(kind)
        torch.save(ckpt, dest)


REFUSED_CODE = 'refused because loading it could run code'
BAD_CHECKPOINTS = {  # kind: what the error line must say
    'code-system': REFUSED_CODE,
    'code-open': REFUSED_CODE,
    'truncated': r'truncated|corrupt',
    'corrupt': r'corrupt|damaged',
    'text': r'corrupt|not a PyTorch checkpoint',
    'plain-dict': r'not a checkpoint written by this example',
    'weights-mismatch': r'damaged or incompatible',
    'missing-weight': r'damaged or incompatible',
    'model-args-mismatch': r'damaged or incompatible',
    'missing-vocab': r'damaged or incompatible',
    'weights-not-a-dict': r'damaged or incompatible',
}


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope='module')
def other_corpus_dir(tmp_path_factory, corpus_dir):
    """Same sizes and structure, other words: the vocabulary differs, the model's shapes do not."""
    d = tmp_path_factory.mktemp('other-corpus')
    for split in SPLITS:
        (d / f'{split}.txt').write_text((corpus_dir / f'{split}.txt').read_text().replace('w', 'v'))
    return d


RESUME_CONFIGS = {
    'main-fp32': ('main.py', []),
    'main-fp16': ('main.py', ['--fp16']),
    'fp16opt-dynamic': ('main_fp16_optimizer.py', ['--fp16', '--dynamic-loss-scale']),
}
RESUME_RECIPES = {  # name: (the recipe's short name, which SAVE.resume records; its header's precision)
    'main-fp32': ('fp32', 'precision fp32 |'),
    'main-fp16': ('fp16-manual', 'precision fp16, manual fp32 master weights, static loss scale 128 |'),
    'fp16opt-dynamic': ('fp16-optimizer-dynamic', 'precision fp16, FP16_Optimizer from '),
}


@pytest.fixture(scope='module')
def resume_runs(tmp_path_factory, corpus_dir):
    """name -> 2 epochs in one go (full_dir), and 1 epoch then --epochs 2 --resume (split_dir); run on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            script, extra = RESUME_CONFIGS[name]
            common = ['--data', corpus_dir, *SMALL, *extra]
            full_dir = tmp_path_factory.mktemp(f'{name}-full')
            split_dir = tmp_path_factory.mktemp(f'{name}-split')
            full = run_script(script, *common, '--epochs', 2, cwd=full_dir, env=ENV)
            first = run_script(script, *common, '--epochs', 1, cwd=split_dir, env=ENV)
            second = run_script(script, *common, '--epochs', 2, '--resume', 'model.pt.resume', cwd=split_dir, env=ENV)
            cache[name] = SimpleNamespace(full=full, first=first, second=second, full_dir=full_dir, split_dir=split_dir)
        return cache[name]
    return get


@pytest.fixture(scope='module')
def best_checkpoint(resume_runs):
    """A real best-model checkpoint (fp32, 2 epochs)."""
    r = resume_runs('main-fp32')
    assert r.full.returncode == 0, describe(r.full)
    return r.full_dir / 'model.pt'


@pytest.fixture(scope='module')
def resume_checkpoint(resume_runs):
    """A real fp32 SAVE.resume (after epoch 2)."""
    r = resume_runs('main-fp32')
    assert r.second.returncode == 0, describe(r.second)
    return r.split_dir / 'model.pt.resume'


@pytest.fixture
def case_dir(tmp_path, best_checkpoint):
    """tmp_path/case holding model.pt (a copy of a real best checkpoint) and an empty directory somedir."""
    case = tmp_path / 'case'
    case.mkdir()
    shutil.copy(best_checkpoint, case / 'model.pt')
    (case / 'somedir').mkdir()
    return case


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
    """Run a command line that argparse itself rejects: SystemExit(2) out of main, usage on stderr."""
    with pytest.raises(SystemExit) as exit_:
        call_script(script, *args, cwd=cwd)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([script, *args], exit_.value.code, out, err)


@pytest.mark.parametrize('script', list(TRAINING_SCRIPTS))
@pytest.mark.parametrize('flag, value', [('--emsize', 'abc'), ('--lr', 'fast'), ('--epochs', '2.5'), ('--dropout', '')])
def test_training_flag_not_a_number(flag, value, script, call_script, capsys, corpus_dir, case_dir):
    """argparse's own type errors: a usage line, then one line naming the flag and the value."""
    before = snapshot(case_dir.parent)
    proc = argparse_error(call_script, capsys, script, '--data', corpus_dir, *SMALL, flag, value, cwd=case_dir)
    line = error_line(proc, script, 2)
    assert line == f"{script}: error: argument {flag}: invalid " \
        f"{'int' if flag == '--epochs' or flag == '--emsize' else 'float'} value: '{value}'"
    assert any(line.startswith('usage: ') for line in proc.stderr.splitlines()), describe(proc)
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
        f"{'float' if flag == '--temperature' else 'int'} value: '{value}'"
    assert_unchanged(before, case_dir.parent)


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
    'fp32-on-fp16-run': ('main-fp16', 'main.py', [], 'model.pt.resume', ['--fp16 was True, now False']),
    'fp16-optimizer-on-manual-fp16-run': ('main-fp16', 'main_fp16_optimizer.py', ['--fp16'], 'model.pt.resume',
                                          # the update steps differ, not any flag
                                          ['the precision recipe was fp16-manual, now fp16-optimizer-static.']),
    'manual-fp16-on-fp16-optimizer-run': ('fp16opt-dynamic', 'main.py', ['--fp16'], 'model.pt.resume',
                                          ['--dynamic-loss-scale was True, now False']),
    'static-on-dynamic-run': ('fp16opt-dynamic', 'main_fp16_optimizer.py', ['--fp16'], 'model.pt.resume',
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


def test_resume_refuses_an_earlier_versions_resume_file(tmp_path, call_script, corpus_dir, resume_checkpoint):
    """SAVE.resume as the version before the recipes wrote it (epoch, batch and update step at the top):
    a sound checkpoint this version cannot continue, a usage error."""
    ckpt = checkpoint.load(str(resume_checkpoint))
    progress = ckpt['resume']['progress']
    ckpt['resume'] = {'epoch': progress['epoch'], 'next_batch': 0, 'hidden': None, 'step': {'recipe': 'fp32'},
                      'rng': ckpt['resume']['rng'], 'cuda_rng': []}
    torch.save(ckpt, tmp_path / 'old.pt.resume')
    before = snapshot(tmp_path)
    proc = call_script('main.py', '--data', corpus_dir, *SMALL, '--epochs', 5, '--resume', 'old.pt.resume', cwd=tmp_path)
    line = error_line(proc, 'main.py', 2)
    assert 'old.pt.resume was written by another version of this example and cannot be resumed.' in line, line
    assert '| epoch' not in proc.stdout
    assert_unchanged(before, tmp_path)


def test_resume_without_the_best_model_file(tmp_path, call_script, corpus_dir, resume_checkpoint):
    """SAVE.resume copied alone to another directory (its run has finished 2 epochs): --resume with
    --epochs 2 has nothing left to train and tests. The best model (SAVE) is not there: that must give a
    clean result (test the resumed weights) or one clear line naming it, not a traceback."""
    shutil.copy(resume_checkpoint, tmp_path / 'model.pt.resume')
    before = snapshot(tmp_path)
    proc = call_script('main.py', '--data', corpus_dir, *SMALL, '--epochs', 2, '--resume', 'model.pt.resume', cwd=tmp_path)
    assert 'Traceback' not in proc.stderr, describe(proc)
    if proc.returncode == 0:
        end_line(proc.stdout)
    else:
        line = error_line(proc, 'main.py', proc.returncode)
        assert 'model.pt' in line, line
        assert_unchanged(before, tmp_path)


# ---------------------------------------------------------------- checkpoints that cannot be used

@pytest.mark.parametrize('kind', ['code-system', 'code-open'])
def test_code_payloads_are_live(kind, tmp_path):
    """The payload files below do run code when loaded without weights_only: the refusal tests mean something."""
    marker = tmp_path / 'MARKER'
    write_code_payload(kind, tmp_path / 'evil.pt', marker)
    assert not marker.exists()
    torch.load(tmp_path / 'evil.pt', weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize('kind', list(BAD_CHECKPOINTS))
def test_generate_refuses_unusable_checkpoint(kind, tmp_path, call_script, case_dir):
    (case_dir / 'out.txt').write_text('earlier output\n')
    marker = tmp_path / 'MARKER'
    write_bad_checkpoint(kind, case_dir / 'model.pt', case_dir / 'bad.pt', marker)
    before = snapshot(tmp_path)
    proc = call_script('generate.py', '--checkpoint', 'bad.pt', '--outf', 'out.txt', '--words', 30, cwd=case_dir)
    line = error_line(proc, 'generate.py', 1)
    assert 'bad.pt' in line, line
    assert re.search(BAD_CHECKPOINTS[kind], line), line
    assert not marker.exists()
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize('kind', [k for k in BAD_CHECKPOINTS if k != 'model-args-mismatch'])
def test_resume_refuses_unusable_checkpoint(kind, tmp_path, call_script, corpus_dir, case_dir, resume_checkpoint):
    marker = tmp_path / 'MARKER'
    write_bad_checkpoint(kind, resume_checkpoint, case_dir / 'bad.pt', marker)
    before = snapshot(tmp_path)
    proc = call_script('main.py', '--data', corpus_dir, *SMALL, '--epochs', 5, '--resume', 'bad.pt', cwd=case_dir)
    line = error_line(proc, 'main.py', 1)
    assert 'bad.pt' in line, line
    assert re.search(BAD_CHECKPOINTS[kind], line), line
    assert not marker.exists()
    assert '| epoch' not in proc.stdout
    assert_unchanged(before, tmp_path)


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


# ---------------------------------------------------------------- signals

def start_training(cwd, data_dir):
    args = [sys.executable, str(REPO / 'main.py'), '--data', str(data_dir), *map(str, SMALL), '--epochs', '1000']
    env = dict(os.environ, PYTHONUNBUFFERED='1', CUDA_VISIBLE_DEVICES='', **ENV)
    proc = subprocess.Popen(args, cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    watchdog = threading.Timer(150, proc.kill)
    watchdog.start()
    return proc, watchdog


def read_until(proc, needle, seen):
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            return True
    return False


def finish(proc, watchdog, seen):
    try:
        rest, err = proc.communicate(timeout=120)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, ''.join(seen) + rest, err)


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
    end_line(out)
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


# ---------------------------------------------------------------- reproducibility

def test_same_seed_same_losses(tmp_path, call_script, corpus_dir, resume_runs):
    """Two runs with the same seed and flags print the same losses; another seed prints others."""
    reference = resume_runs('main-fp32').full
    assert reference.returncode == 0, describe(reference)
    again = run_script('main.py', '--data', corpus_dir, *SMALL, '--epochs', 2, cwd=tmp_path, env=ENV)
    assert again.returncode == 0, describe(again)
    ref_lines = progress_by_epoch(reference.stdout)
    assert sum(len(lines) for lines in ref_lines.values()) >= 16, ref_lines
    assert progress_by_epoch(again.stdout) == ref_lines
    assert end_line(again.stdout) == end_line(reference.stdout)

    (tmp_path / 'seed2').mkdir()
    other = call_script('main.py', '--data', corpus_dir, *SMALL, '--epochs', 2, '--seed', 2, cwd=tmp_path / 'seed2')
    assert other.returncode == 0, describe(other)
    assert progress_by_epoch(other.stdout) != ref_lines


# ---------------------------------------------------------------- real processes fail the same way

# What a package may print on stderr whenever Python starts (torch without numpy says this).
STARTUP_NOISE = ('/usr/lib/python3/site-packages/torch/_subclasses/functional_tensor.py:279: UserWarning: '
                 'Failed to initialize NumPy: No module named \'numpy\' (Triggered internally at '
                 '/pytorch/torch/csrc/utils/tensor_numpy.cpp:81.)\n'
                 '  cpu = _conversion_method_template(device=torch.device("cpu"))\n')


@pytest.fixture(scope='module')
def noisy_env(tmp_path_factory):
    """Environment for run_script that makes every Python start-up print STARTUP_NOISE on stderr:
    a sitecustomize.py in a directory put first on PYTHONPATH."""
    d = tmp_path_factory.mktemp('startup-noise')
    (d / 'sitecustomize.py').write_text(f'import sys\nsys.stderr.write({STARTUP_NOISE!r})\nsys.stderr.flush()\n')
    pythonpath = os.pathsep.join(p for p in (str(d), os.environ.get('PYTHONPATH')) if p)
    return dict(ENV, PYTHONPATH=pythonpath)


def run_real(script, args, cwd, noisy_env, noisy):
    proc = run_script(script, *args, cwd=cwd, env=noisy_env if noisy else ENV)
    assert (STARTUP_NOISE in proc.stderr) == noisy, describe(proc)  # the noise is there, or not, as asked
    return proc


REAL_ERROR_CASES = {
    # name: (script, arguments ({corpus}: the good corpus, {bad}: one whose test.txt is not UTF-8),
    #        exit code, a regular expression the error line must match)
    'main-flag': ('main.py', ['--data', '{corpus}', *SMALL, '--lr', '-1'], 2,
                  r'--lr must be a positive number \(got -1\)\.$'),
    'main-argparse': ('main.py', ['--data', '{corpus}', *SMALL, '--emsize', 'abc'], 2,
                      r"argument --emsize: invalid int value: 'abc'$"),
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


def assert_trained(proc, cwd):
    """A clean training run of main.py with SMALL and --epochs 1."""
    assert proc.returncode == 0, describe(proc)
    assert 'Traceback' not in proc.stdout + proc.stderr and ': error: ' not in proc.stderr, describe(proc)
    assert header(proc.stdout).startswith('| device cpu | precision fp32 |')
    assert sorted(progress_by_epoch(proc.stdout)) == [1]
    end_line(proc.stdout)
    assert sorted(p.name for p in cwd.iterdir()) == ['model.pt', 'model.pt.metrics.jsonl', 'model.pt.resume']
    checkpoint.load_model(str(cwd / 'model.pt'))
    assert checkpoint.load(str(cwd / 'model.pt.resume'))['resume']['progress']['epoch'] == 2


@pytest.mark.parametrize('noisy', [False, True])
def test_real_training_run_with_startup_noise(noisy, tmp_path, corpus_dir, noisy_env):
    proc = run_real('main.py', ['--data', corpus_dir, *SMALL, '--epochs', 1], tmp_path, noisy_env, noisy)
    assert_trained(proc, tmp_path)
