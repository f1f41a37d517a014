"""Robustness of main.py, main_fp16_optimizer.py and generate.py.

- bad flag values and paths fail fast: one line on stderr naming the flag and the value,
  exit 2, no traceback, nothing written and the existing --save file untouched;
- --resume continues a run exactly (fp32, manual fp16, FP16_Optimizer with a dynamic scale)
  and refuses, without touching anything, a run it cannot continue;
- SIGINT / SIGTERM stop after the current batch and leave SAVE.resume; a second signal quits
  at once and leaves only whole files;
- an fp32 run whose gradients become non-finite stops with 'training diverged';
- checkpoints that would run code, are truncated, corrupt, foreign or inconsistent are refused
  with one clear line, by generate.py and by --resume;
- corpora that cannot be used are refused with one clear line naming the file;
- the same seed and flags print the same losses.

Most error cases run through ForkRunner: one helper process imports torch once, then forks a
child per case that runs the script as __main__ with its arguments, as `python3 script.py ARGS`
does, so a case costs milliseconds instead of a torch import.
test_fork_runner_matches_real_processes checks that its exit codes and stderr are those of
real processes. Training runs, --resume runs and signals use real processes.
"""
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ENV, REPO, run_script, structured_text

import checkpoint

SPLITS = ('train', 'valid', 'test')

# A tiny model; dropout > 0 so that exact resumption needs the RNG state too.
SMALL = ['--emsize', 16, '--nhid', 16, '--batch_size', 8, '--bptt', 10, '--log-interval', 5,
         '--lr', 5, '--dropout', 0.2, '--save', 'model.pt']

END_RE = re.compile(r'\| End of training \| test loss +\S+ \| test ppl +\S+')
TIMING_RE = re.compile(r'(ms/batch|tok/s|eta|time:) +[\d.]+s?')


# ---------------------------------------------------------------- helpers

SERVER = r'''
import json, os, runpy, signal, sys, time, traceback
repo = sys.argv[1]
sys.path.insert(0, repo)
import torch  # the expensive imports, done once: each case runs in a fork
import checkpoint, cli, data, fp16_utils, model, training  # noqa: F401
# The first optimizer and GradScaler cost more than a second of lazy imports: pay it here too.
torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0, foreach=True)
torch.amp.GradScaler('cpu', enabled=False)


def child(req):
    code = 1
    try:
        os.chdir(req['cwd'])
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        for fd, path in ((1, req['out']), (2, req['err'])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        script = os.path.join(repo, req['script'])
        sys.argv = [script] + req['args']
        sys.path[0] = os.path.dirname(script)
        try:
            runpy.run_path(script, run_name='__main__')
            code = 0
        except SystemExit as e:  # what the interpreter does with SystemExit
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:  # and with any other uncaught exception
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code & 0xFF)


for line in iter(sys.stdin.readline, ''):
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(req)
    deadline = time.monotonic() + req['timeout']
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            done, status = os.waitpid(pid, 0)
            break
        time.sleep(0.002)
    sys.stdout.write(json.dumps({'rc': os.waitstatus_to_exitcode(status)}) + '\n')
    sys.stdout.flush()
'''


class ForkRunner:
    """Runs a repository script in a fork of a process that has imported torch; returns a CompletedProcess."""

    def __init__(self, workdir):
        self.workdir = Path(workdir)
        self.count = 0
        env = dict(os.environ, PYTHONUNBUFFERED='1', CUDA_VISIBLE_DEVICES='', **ENV)
        self.server = subprocess.Popen([sys.executable, '-c', SERVER, str(REPO)], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, env=env, cwd=str(self.workdir))

    def __call__(self, script, *args, cwd, timeout=120):
        self.count += 1
        out, err = self.workdir / f'{self.count}.out', self.workdir / f'{self.count}.err'
        args = [str(a) for a in args]
        request = {'script': str(script), 'args': args, 'cwd': str(cwd), 'out': str(out), 'err': str(err),
                   'timeout': timeout}
        self.server.stdin.write(json.dumps(request) + '\n')
        self.server.stdin.flush()
        reply = self.server.stdout.readline()
        if not reply:
            raise RuntimeError(f'the fork server died (exit code {self.server.poll()})')
        rc = json.loads(reply)['rc']
        return subprocess.CompletedProcess([str(script), *args], rc, out.read_text(errors='replace'),
                                           err.read_text(errors='replace'))

    def close(self):
        self.server.stdin.close()
        self.server.wait(timeout=30)


def describe(proc):
    return f'exit code {proc.returncode}\n--- stdout:\n{proc.stdout[-4000:]}\n--- stderr:\n{proc.stderr[-4000:]}'


def error_line(proc, script, rc):
    """The one stderr line of a clean failure with exit code rc."""
    assert proc.returncode == rc, describe(proc)
    assert 'Traceback' not in proc.stderr and 'Traceback' not in proc.stdout, describe(proc)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, describe(proc)
    assert lines[0].startswith(f'{script}: error: '), describe(proc)
    return lines[0]


def snapshot(root):
    """Every file (its bytes) and directory under root."""
    root = Path(root)
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else 'dir') for p in sorted(root.rglob('*'))}


def assert_unchanged(before, root):
    after = snapshot(root)
    assert sorted(after) == sorted(before), 'files appeared or vanished'
    changed = [name for name in before if before[name] != after[name]]
    assert not changed, f'changed: {changed}'


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
def fast_run(tmp_path_factory):
    runner = ForkRunner(tmp_path_factory.mktemp('fork-runner'))
    yield runner
    runner.close()


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


# ---------------------------------------------------------------- the fork runner is faithful

def test_fork_runner_matches_real_processes(tmp_path, fast_run, corpus_dir, case_dir):
    (case_dir / 'notes.txt').write_text('not a checkpoint\n')
    cases = [('main.py', ['--data', corpus_dir, *SMALL, '--lr', '-1']),
             ('generate.py', ['--checkpoint', 'notes.txt', '--outf', 'out.txt'])]
    for script, args in cases:
        real = run_script(script, *args, cwd=case_dir, env=ENV)
        forked = fast_run(script, *args, cwd=case_dir)
        assert (forked.returncode, forked.stderr, forked.stdout) == (real.returncode, real.stderr, real.stdout)
        assert real.returncode != 0 and real.stderr
    # an uncaught exception: a traceback and exit code 1 in both, so 'no Traceback' checks can fail
    crash = tmp_path / 'crash.py'
    crash.write_text('import sys\nprint("before", flush=True)\nraise ValueError("boom " + sys.argv[1])\n')
    real = subprocess.run([sys.executable, str(crash), "x"], cwd=str(case_dir), capture_output=True, text=True,
                          check=False)
    forked = fast_run(crash, 'x', cwd=case_dir)
    for proc in (real, forked):
        assert proc.returncode == 1 and proc.stdout == 'before\n'
        assert proc.stderr.startswith('Traceback (most recent call last):')
        assert proc.stderr.splitlines()[-1] == 'ValueError: boom x'


# ---------------------------------------------------------------- bad flags fail fast

BAD_TRAINING_FLAGS = [  # (flag, value); the error line must show the value as given
    ('--emsize', '0'), ('--emsize', '-16'), ('--nhid', '0'), ('--nhid', '-1'), ('--nlayers', '0'), ('--nlayers', '-2'),
    ('--epochs', '0'), ('--epochs', '-3'), ('--batch_size', '0'), ('--batch_size', '-8'), ('--bptt', '0'),
    ('--bptt', '-10'), ('--log-interval', '0'), ('--log-interval', '-5'),
    ('--dropout', '-0.1'), ('--dropout', '1'), ('--dropout', '1.5'), ('--dropout', 'nan'),
    ('--lr', '0'), ('--lr', '-1'), ('--lr', 'nan'), ('--lr', 'inf'),
    ('--clip', '0'), ('--clip', '-0.25'), ('--clip', 'nan'),
    ('--static-loss-scale', '0'), ('--static-loss-scale', '-128'), ('--static-loss-scale', 'nan'),
    ('--model', 'lstm'), ('--model', 'Transformer'),
    ('--batch_size', '2000'), ('--batch_size', '1000000'),  # more columns than the ~3000 train tokens allow
]

BAD_TRAINING_PATHS = [  # (flag, value); {corpus} is the good corpus directory
    ('--data', 'no-such-dir'), ('--data', '{corpus}/train.txt'), ('--data', ''),
    ('--save', 'somedir'), ('--save', 'no-such-dir/model.pt'), ('--save', 'model.pt/inside.pt'), ('--save', ''),
    ('--resume', 'no-such.pt.resume'), ('--resume', 'somedir'), ('--resume', ''),
]

TRAINING_SCRIPTS = {'main.py': [], 'main_fp16_optimizer.py': ['--fp16']}


def check_bad_flag(fast_run, script, base, flag, value, case_dir, extra=()):
    root = case_dir.parent
    before = snapshot(root)
    proc = fast_run(script, *base, *extra, flag, value, cwd=case_dir)
    line = error_line(proc, script, 2)
    assert flag in line, line
    assert value in line, line
    assert '| device' not in proc.stdout and '| epoch' not in proc.stdout  # nothing started
    assert_unchanged(before, root)  # the --save file is whole, no SAVE.resume, no temporary file
    return line


@pytest.mark.parametrize('script', list(TRAINING_SCRIPTS))
@pytest.mark.parametrize('flag, value', BAD_TRAINING_FLAGS + BAD_TRAINING_PATHS,
                         ids=[f'{f}={v}' for f, v in BAD_TRAINING_FLAGS + BAD_TRAINING_PATHS])
def test_bad_training_flag(script, flag, value, fast_run, corpus_dir, case_dir):
    value = value.format(corpus=corpus_dir)
    base = ['--data', corpus_dir, *SMALL, '--epochs', 1, *TRAINING_SCRIPTS[script]]
    check_bad_flag(fast_run, script, base, flag, value, case_dir)


def test_tied_needs_equal_sizes(fast_run, corpus_dir, case_dir):
    base = ['--data', corpus_dir, *SMALL, '--epochs', 1]
    line = check_bad_flag(fast_run, 'main.py', base, '--nhid', '32', case_dir, extra=['--tied'])
    assert '--tied' in line and 'emsize 16' in line and 'nhid 32' in line, line


@pytest.mark.parametrize('flag, value', [('--emsize', 'abc'), ('--lr', 'fast'), ('--epochs', '2.5'), ('--dropout', '')])
def test_training_flag_not_a_number(flag, value, fast_run, corpus_dir, case_dir):
    """argparse's own type errors: a usage line, then one line naming the flag and the value."""
    before = snapshot(case_dir.parent)
    proc = fast_run('main.py', '--data', corpus_dir, *SMALL, flag, value, cwd=case_dir)
    assert proc.returncode == 2, describe(proc)
    assert 'Traceback' not in proc.stderr, describe(proc)
    assert proc.stderr.splitlines()[-1] == f"main.py: error: argument {flag}: invalid " \
        f"{'int' if flag == '--epochs' or flag == '--emsize' else 'float'} value: '{value}'"
    assert_unchanged(before, case_dir.parent)


BAD_GENERATE_FLAGS = [
    ('--temperature', '0'), ('--temperature', '-1'), ('--temperature', 'nan'),
    ('--words', '-1'), ('--log-interval', '0'), ('--log-interval', '-1'),
    ('--outf', 'no-such-dir/out.txt'), ('--outf', 'somedir'), ('--outf', ''),
    ('--checkpoint', 'no-such-model.pt'), ('--checkpoint', 'somedir'),
]


@pytest.mark.parametrize('flag, value', BAD_GENERATE_FLAGS, ids=[f'{f}={v}' for f, v in BAD_GENERATE_FLAGS])
def test_bad_generate_flag(flag, value, fast_run, case_dir):
    (case_dir / 'out.txt').write_text('earlier output\n')
    base = ['--checkpoint', 'model.pt', '--outf', 'out.txt', '--words', 30, '--log-interval', 10]
    check_bad_flag(fast_run, 'generate.py', base, flag, value, case_dir)


# ---------------------------------------------------------------- --resume

@pytest.mark.parametrize('name', list(RESUME_CONFIGS))
def test_resume_continues_exactly(name, resume_runs):
    """2 epochs in one go == 1 epoch, then --resume for the 2nd: same losses, same test loss, same weights."""
    r = resume_runs(name)
    for proc in (r.full, r.first, r.second):
        assert proc.returncode == 0, describe(proc)
        assert 'Traceback' not in proc.stderr, describe(proc)
    assert '| resuming model.pt.resume at epoch 2, batch 0' in r.second.stdout, r.second.stdout
    full, first, second = (progress_by_epoch(p.stdout) for p in (r.full, r.first, r.second))
    assert sorted(full) == [1, 2] and sorted(first) == [1] and sorted(second) == [2], (full, first, second)
    assert sum(line.startswith('| epoch') for line in full[2]) >= 7, full[2]  # 38 batches, a line every 5
    assert second[2] == full[2]
    assert first[1] == full[1]
    assert end_line(r.second.stdout) == end_line(r.full.stdout)
    for name_ in ('model.pt', 'model.pt.resume'):
        a, b = checkpoint.load(str(r.full_dir / name_)), checkpoint.load(str(r.split_dir / name_))
        assert weights_equal(a['model'], b['model']), name_
    assert checkpoint.load(str(r.split_dir / 'model.pt.resume'))['resume']['epoch'] == 3


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
                                          ['recipe']),  # the update steps differ, not any flag
    'best-model-file': ('main-fp32', 'main.py', [], 'model.pt', ['best-model checkpoint', 'not a resume checkpoint']),
}


@pytest.mark.parametrize('name', list(RESUME_MISMATCHES))
def test_resume_refuses_a_run_it_cannot_continue(name, tmp_path, fast_run, resume_runs, corpus_dir, other_corpus_dir):
    source, script, extra, resume_file, needles = RESUME_MISMATCHES[name]
    r = resume_runs(source)
    assert r.second.returncode == 0, describe(r.second)
    case = tmp_path / 'case'
    case.mkdir()
    for f in ('model.pt', 'model.pt.resume'):
        shutil.copy(r.split_dir / f, case / f)
    before = snapshot(tmp_path)
    extra = [str(a).format(other_corpus=other_corpus_dir) for a in extra]
    proc = fast_run(script, '--data', corpus_dir, *SMALL, '--epochs', 5, *extra, '--resume', resume_file, cwd=case)
    line = error_line(proc, script, 2)
    assert resume_file in line, line
    if resume_file.endswith('.resume'):
        assert f'cannot resume from {resume_file}' in line, line
    for needle in needles:
        assert needle in line, line
    assert '| epoch' not in proc.stdout
    assert_unchanged(before, tmp_path)


def test_resume_without_the_best_model_file(tmp_path, fast_run, corpus_dir, resume_checkpoint):
    """SAVE.resume copied alone to another directory (its run has finished 2 epochs): --resume with
    --epochs 2 has nothing left to train and tests. The best model (SAVE) is not there: that must give a
    clean result (test the resumed weights) or one clear line naming it, not a traceback."""
    shutil.copy(resume_checkpoint, tmp_path / 'model.pt.resume')
    before = snapshot(tmp_path)
    proc = fast_run('main.py', '--data', corpus_dir, *SMALL, '--epochs', 2, '--resume', 'model.pt.resume', cwd=tmp_path)
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
def test_generate_refuses_unusable_checkpoint(kind, tmp_path, fast_run, case_dir):
    (case_dir / 'out.txt').write_text('earlier output\n')
    marker = tmp_path / 'MARKER'
    write_bad_checkpoint(kind, case_dir / 'model.pt', case_dir / 'bad.pt', marker)
    before = snapshot(tmp_path)
    proc = fast_run('generate.py', '--checkpoint', 'bad.pt', '--outf', 'out.txt', '--words', 30, cwd=case_dir)
    line = error_line(proc, 'generate.py', 1)
    assert 'bad.pt' in line, line
    assert re.search(BAD_CHECKPOINTS[kind], line), line
    assert not marker.exists()
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize('kind', [k for k in BAD_CHECKPOINTS if k != 'model-args-mismatch'])
def test_resume_refuses_unusable_checkpoint(kind, tmp_path, fast_run, corpus_dir, case_dir, resume_checkpoint):
    marker = tmp_path / 'MARKER'
    write_bad_checkpoint(kind, resume_checkpoint, case_dir / 'bad.pt', marker)
    before = snapshot(tmp_path)
    proc = fast_run('main.py', '--data', corpus_dir, *SMALL, '--epochs', 5, '--resume', 'bad.pt', cwd=case_dir)
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
def test_unusable_corpus(kind, script, tmp_path, fast_run, corpus_dir, case_dir):
    rc, split, needles = BAD_CORPORA[kind]
    bad = tmp_path / 'bad-data'
    extra = write_bad_corpus(kind, bad, corpus_dir)
    before = snapshot(tmp_path)
    proc = fast_run(script, '--data', bad, *SMALL, '--epochs', 1, *TRAINING_SCRIPTS[script], *extra, cwd=case_dir)
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
def test_diverging_fp32_run_stops(name, tmp_path, corpus_dir, case_dir):
    """The run stops in epoch 1 with 'training diverged'; the model.pt of an earlier run is untouched."""
    before = snapshot(tmp_path)
    proc = run_script('main.py', '--data', corpus_dir, *SMALL, '--epochs', 2, *DIVERGING[name], cwd=case_dir, env=ENV)
    line = error_line(proc, 'main.py', 1)
    assert 'training diverged' in line and 'in epoch 1' in line and 'no model was saved' in line, line
    assert '| end of epoch' not in proc.stdout
    assert_unchanged(before, tmp_path)


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
    assert done.stderr == '', describe(done)
    assert f'| {signame}: stopping after this batch' in out
    assert 'Exiting from training early; continue with --resume model.pt.resume' in out
    end_line(out)
    assert not list(tmp_path.glob('.*.tmp'))

    ckpt = checkpoint.load(str(tmp_path / 'model.pt.resume'))
    state = ckpt['resume']
    finished = out.count('| end of epoch')
    assert state['epoch'] == finished + 1 and finished < 1000, (state['epoch'], state['next_batch'], out)
    if state['next_batch']:  # stopped inside an epoch: the last batch trained is logged
        assert re.search(rf'^\| epoch +{state["epoch"]} \| +{state["next_batch"]}/', out, re.MULTILINE), out
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
        after = checkpoint.load(str(tmp_path / 'model.pt.resume'))['resume']
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
        assert files == ['model.pt', 'model.pt.resume'], files
    assert not [f for f in files if f.endswith('.tmp')], files
    for f in files:
        checkpoint.load(str(tmp_path / f))  # every file left is a whole checkpoint


# ---------------------------------------------------------------- reproducibility

def test_same_seed_same_losses(tmp_path, fast_run, corpus_dir, resume_runs):
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
    other = fast_run('main.py', '--data', corpus_dir, *SMALL, '--epochs', 2, '--seed', 2, cwd=tmp_path / 'seed2')
    assert other.returncode == 0, describe(other)
    assert progress_by_epoch(other.stdout) != ref_lines
