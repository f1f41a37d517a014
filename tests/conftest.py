"""Shared helpers for the test suite: the repository root, tiny corpora, script runs
(real processes, and in this process through cli.run), and the checks of a clean failure."""
import contextlib
import importlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from plumbing import cpu_fp16_matmul  # noqa: E402  (needs the path above)

# fp16 products as the scripts compute them on this CPU (cpu_fp16_matmul.prepare), from the first
# test on: in-process runs then match the scripts run as processes, whatever order tests run in.
if cpu_fp16_matmul.fp16_is_emulated(torch.device('cpu')):
    cpu_fp16_matmul.use_fp32_products()


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


@pytest.fixture(scope='module')
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
    argparse's own errors raise SystemExit out of call, as they do out of main.

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
