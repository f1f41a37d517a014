"""Shared by tests/lesson, tests/plumbing and tests/scripts: the repository root, tiny corpora, script runs
(real processes, and in this process through cli.run), the checks of a clean failure, tiny models and
batches, the flags of small runs, and session-wide runs (stopped, resumed) that several files read."""
import contextlib
import importlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from model import RNNModel  # noqa: E402  (needs the path above)
from plumbing import checkpoint, cpu_fp16_matmul  # noqa: E402

# fp16 and bf16 products as the scripts compute them on this CPU (cpu_fp16_matmul.prepare), from the first
# test on: in-process runs then match the scripts run as processes, whatever order tests run in.
for low in (torch.float16, torch.bfloat16):
    if cpu_fp16_matmul.is_emulated(low, torch.device('cpu')):
        cpu_fp16_matmul.use_fp32_products(low)


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """One intra-op thread in every test, as ENV gives the script runs: the models are tiny, and OpenMP
    threads spinning on a busy 2-core machine slow each step down several times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def signal_dispositions_restored():
    """SIGINT, SIGTERM and SIGHUP as they were before each test: an in-process run that leaves one ignored
    would pass SIG_IGN on to every script started later, and the scripts keep an ignored signal ignored."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for s, handler in before.items():
        if signal.getsignal(s) is not handler and handler is not None:
            signal.signal(s, handler)


@pytest.fixture(scope='session')
def repo():
    return REPO


def write_corpus(directory, train, valid, test, mode='w'):
    """Write train/valid/test.txt (str written as UTF-8 with no newline translation, or bytes)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in (('train', train), ('valid', valid), ('test', test)):
        path = directory / f'{name}.txt'
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_bytes(content.encode('utf-8'))
    return directory


def structured_text(rng, ntokens, vocab_size=16, line_len=(4, 12)):
    """Text from a small Markov chain: each word is mostly followed by one fixed successor,
    so even a tiny LSTM learns it within a few dozen updates and the training loss goes down."""
    words = [f'w{i}' for i in range(vocab_size)]
    order = words[:]
    rng.shuffle(order)
    succ = {w: order[(order.index(w) + 1) % vocab_size] for w in words}
    lines, count = [], 0
    word = rng.choice(words)
    while count < ntokens:
        n = rng.randint(*line_len)
        line = []
        for _ in range(n):
            line.append(word)
            word = succ[word] if rng.random() < 0.85 else rng.choice(words)
        lines.append(' '.join(line))
        count += n + 1
    return '\n'.join(lines) + '\n'


def make_tiny_corpus(directory, seed=0):
    rng = random.Random(seed)
    # One chain for all splits (same successors), different samples.
    text = structured_text(rng, 4000)
    lines = text.splitlines(keepends=True)
    # ~3000 train tokens, ~500 valid, ~500 test
    train, valid, test, n = [], [], [], 0
    for line in lines:
        n += len(line.split()) + 1
        (train if n <= 3000 else valid if n <= 3500 else test).append(line)
    return write_corpus(directory, ''.join(train), ''.join(valid), ''.join(test))


# One intra-op thread for script runs: the models are tiny, and spinning OpenMP threads
# slow every batch down on a busy 2-core machine.
ENV = {'OMP_NUM_THREADS': '1'}

# The stderr rule made structural: every Python process the suite starts (through os.environ, which
# every helper passes on, torchrun's ranks included) prints START_UP_LINE on stderr when it starts,
# from a sitecustomize.py put first on PYTHONPATH, as a package's harmless warning would; call_script
# prints it too. A test that asserts a whole stderr stream fails at once; assert the sentence instead.
START_UP_LINE = 'tests/conftest.py: a harmless start-up line on stderr, as another package may print'
STARTUP_DIR = REPO / 'tests' / 'startup_line'
os.environ['PYTHONPATH'] = os.pathsep.join(p for p in (str(STARTUP_DIR), os.environ.get('PYTHONPATH')) if p)


@pytest.fixture(scope='session')
def corpus_dir(tmp_path_factory):
    return make_tiny_corpus(tmp_path_factory.mktemp('corpus'))


def run_script(script, *args, cwd, timeout=240, env=None, umask=None):
    """Run one of the repository's scripts with this Python (under umask, if given); returns CompletedProcess (text)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED='1', CUDA_VISIBLE_DEVICES='')
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=str(cwd),
                          capture_output=True, text=True, timeout=timeout, env=full_env,
                          umask=-1 if umask is None else umask)


SCRIPT_MODULES = {'main.py': 'main', 'main_fp16_optimizer.py': 'main_fp16_optimizer', 'generate.py': 'generate',
                  'plot.py': 'plot'}


@pytest.fixture
def call_script(monkeypatch, capsys):
    """call(script, *args, cwd=...): run the script's main(args) in this process through cli.run, as
    `python SCRIPT ARGS` would in cwd (sys.argv[0] is the script, so errors start 'SCRIPT: error: '),
    with no CUDA device, as run_script hides it; returns a CompletedProcess with what it printed.
    -h raises SystemExit out of call, as it does out of main.

    torch's RNG state and thread count are restored afterwards (training runs seed and use them)."""
    from plumbing import cli
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.accelerator, 'is_available', lambda: False)
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    torch.set_num_threads(1)

    def call(script, *args, cwd):
        main = importlib.import_module(SCRIPT_MODULES[script]).main
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, 'argv', [str(REPO / script)])
        capsys.readouterr()  # only what this call prints
        print(START_UP_LINE, file=sys.stderr)
        args = [str(a) for a in args]
        code = cli.guarded_main(main, args)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess([script, *args], code, out, err)

    yield call
    torch.set_rng_state(rng)
    torch.set_num_threads(threads)


@contextlib.contextmanager
def umask(mask):
    """This process's umask set to mask for the block, then restored."""
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def file_mode(path):
    return os.stat(path).st_mode & 0o777


def temp_files(directory):
    """Temporary files atomic_write leaves behind if it fails to clean up."""
    return sorted(p.name for p in Path(directory).glob('.*.tmp'))


# ---------------------------------------------------------------- a clean failure

def describe(proc):
    return f'exit code {proc.returncode}\n--- stdout:\n{proc.stdout[-4000:]}\n--- stderr:\n{proc.stderr[-4000:]}'


def error_line(proc, script, rc):
    """The sentence of a clean failure: exit code rc, no traceback, and on stderr exactly one line
    starting 'SCRIPT: error: ' (whatever else the interpreter or a package printed there)."""
    assert proc.returncode == rc, describe(proc)
    assert 'Traceback' not in proc.stderr and 'Traceback' not in proc.stdout, describe(proc)
    prefix = f'{script}: error: '
    lines = [line for line in proc.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, describe(proc)
    assert len(lines[0]) > len(prefix) and prefix not in proc.stdout, describe(proc)
    return lines[0]


# ---------------------------------------------------------------- tiny models, batches and runs

NTOKEN, BSZ, SEQ = 40, 4, 6


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return RNNModel('LSTM', NTOKEN, 16, 16, 1, dropout=0.0)


def batch(seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(NTOKEN, (SEQ, BSZ), generator=g), torch.randint(NTOKEN, (SEQ * BSZ,), generator=g)

ADAMW_LR, ADAMW_CLIP = 0.01, 0.25

# The script and flags that select each recipe.
ADAMW_FLAGS = {
    'fp32': ('main.py', []),
    'amp': ('main.py', ['--amp']),
    'bf16': ('main.py', ['--bf16']),
    'fp16-manual': ('main.py', ['--fp16']),
    'fp16-optimizer-static': ('main_fp16_optimizer.py', ['--fp16']),
    'fp16-optimizer-dynamic': ('main_fp16_optimizer.py', ['--fp16', '--dynamic-loss-scale']),
}
TINY_RUN = ['--emsize', 16, '--nhid', 16, '--batch_size', 8, '--bptt', 10, '--log-interval', 5,
            '--dropout', 0, '--save', 'model.pt', '--lr', ADAMW_LR]

TRANSFORMER = ['--model', 'Transformer', '--emsize', 16, '--nhid', 32, '--nhead', 2, '--nlayers', 2,
               '--batch_size', 8, '--bptt', 10, '--log-interval', 5, '--lr', 5, '--save', 'model.pt']
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


def losses(recs):
    """(kind, epoch, batch, loss, loss scale, skipped) of each train, epoch and end record."""
    return [(r['kind'], r.get('epoch'), r.get('batch'), r.get('loss', r.get('valid_loss', r.get('test_loss'))),
             r.get('loss_scale'), r.get('skipped')) for r in recs if r['kind'] != 'run']

def records(directory):
    return [json.loads(line) for line in (directory / 'model.pt.metrics.jsonl').read_text().splitlines()]


TRAIN_ARGS = ['--epochs', 2, '--emsize', 16, '--nhid', 16, '--batch_size', 8, '--bptt', 10,
              '--log-interval', 5, '--save', 'model.pt', '--lr', 5, '--dropout', 0]


def assert_clean_error(proc, script, rc, *needles):
    line = error_line(proc, script, rc)
    for needle in needles:
        assert needle in line, line


# ---------------------------------------------------------------- runs several test files read

RUNS = {
    'main-fp32': ('main.py', []),
    'main-fp16': ('main.py', ['--fp16']),
    'fp16opt-static': ('main_fp16_optimizer.py', ['--fp16']),
    'fp16opt-dynamic': ('main_fp16_optimizer.py', ['--fp16', '--dynamic-loss-scale']),
}


@pytest.fixture(scope='session')
def training_runs(tmp_path_factory, corpus_dir):
    """Runs each configuration once, on first use: name -> (CompletedProcess, working directory)."""
    cache = {}

    def get(name):
        if name not in cache:
            script, extra = RUNS[name]
            cwd = tmp_path_factory.mktemp(name)
            proc = run_script(script, '--data', corpus_dir, *TRAIN_ARGS, *extra, cwd=cwd, env=ENV, umask=0o022)
            cache[name] = (proc, cwd)
        return cache[name]
    return get


@pytest.fixture(scope='session')
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


@pytest.fixture(scope='session')
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


@pytest.fixture(scope='session')
def best_checkpoint(resume_runs):
    """A real best-model checkpoint (fp32, 2 epochs)."""
    r = resume_runs('main-fp32')
    assert r.full.returncode == 0, describe(r.full)
    return r.full_dir / 'model.pt'


@pytest.fixture(scope='session')
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


def same(a, b):
    """Equal nested dicts, lists and tuples of tensors and plain values (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b
