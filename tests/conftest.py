"""Shared helpers for the test suite: the repository root, tiny corpora, script runs."""
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


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


@pytest.fixture(scope='module')
def corpus_dir(tmp_path_factory):
    return make_tiny_corpus(tmp_path_factory.mktemp('corpus'))


def run_script(script, *args, cwd, timeout=240, env=None):
    """Run one of the repository's scripts with this Python; returns CompletedProcess (text)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED='1', CUDA_VISIBLE_DEVICES='')
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=str(cwd),
                          capture_output=True, text=True, timeout=timeout, env=full_env)
