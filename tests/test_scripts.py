"""End-to-end runs of main.py, main_fp16_optimizer.py and generate.py on a tiny generated corpus."""
import math
import os
import re
import signal
import subprocess
import sys
import threading

import pytest
import torch

import checkpoint
import data
from conftest import ENV, REPO, run_script

TRAIN_ARGS = ['--epochs', 2, '--emsize', 16, '--nhid', 16, '--batch_size', 8, '--bptt', 10,
              '--log-interval', 5, '--save', 'model.pt', '--lr', 5, '--dropout', 0]

RUNS = {
    'main-fp32': ('main.py', []),
    'main-fp16': ('main.py', ['--fp16']),
    'fp16opt-static': ('main_fp16_optimizer.py', ['--fp16']),
    'fp16opt-dynamic': ('main_fp16_optimizer.py', ['--fp16', '--dynamic-loss-scale']),
}

LOSS_RE = re.compile(r'^\| epoch +\d+ \| +\d+/ *(\d+) batches .*\| loss +(\d+\.\d+) \|', re.M)
END_RE = re.compile(r'\| End of training \| test loss +(\d+\.\d+) \| test ppl +(\S+)')


@pytest.fixture(scope='module')
def training_runs(tmp_path_factory, corpus_dir):
    """Runs each configuration once, on first use: name -> (CompletedProcess, working directory)."""
    cache = {}

    def get(name):
        if name not in cache:
            script, extra = RUNS[name]
            cwd = tmp_path_factory.mktemp(name)
            proc = run_script(script, '--data', corpus_dir, *TRAIN_ARGS, *extra, cwd=cwd, env=ENV)
            cache[name] = (proc, cwd)
        return cache[name]
    return get


def assert_clean_error(proc, *needles):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert 'Traceback' not in proc.stderr and 'Traceback' not in proc.stdout, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert 'error' in lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize('name', list(RUNS))
def test_training_run(name, training_runs, corpus_dir):
    proc, cwd = training_runs(name)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert 'Traceback' not in proc.stderr, proc.stderr

    # the periodic lines: every log interval, in both epochs; the loss goes down
    logged = LOSS_RE.findall(out)
    nbatches = int(logged[0][0])
    assert len(logged) == 2 * (nbatches // 5), out
    losses = [float(loss) for _, loss in logged]
    assert losses[-1] < losses[0], losses
    assert out.count('| end of epoch') == 2

    m = END_RE.search(out)
    assert m, out
    test_loss, test_ppl = float(m.group(1)), float(m.group(2))
    assert math.isfinite(test_loss) and test_ppl == pytest.approx(math.exp(test_loss), rel=0.01)

    # the checkpoint: the best epoch's weights, the vocabulary of the padded corpus
    ckpt_path = cwd / 'model.pt'
    assert ckpt_path.is_file()
    ckpt = checkpoint.load(str(ckpt_path))
    corpus = data.Corpus(str(corpus_dir), pad_to_multiple_of=8)
    assert ckpt['vocab']['idx2word'] == corpus.dictionary.idx2word
    assert ckpt['vocab']['padding'] == corpus.dictionary.padding
    valid = [float(v) for v in re.findall(r'\| valid loss +(\d+\.\d+)', out)]
    assert ckpt['best_val_loss'] == pytest.approx(min(valid), abs=0.006)
    fp16 = '--fp16' in RUNS[name][1]
    weight_dtype = ckpt['model']['encoder.weight'].dtype
    assert weight_dtype == (torch.float16 if fp16 else torch.float32)
    model, idx2word, padding = checkpoint.load_model(str(ckpt_path))
    assert model.encoder.num_embeddings == len(idx2word) == len(corpus.dictionary)
    assert not list(cwd.glob('.*.tmp'))  # no temporary file left by the atomic save

    header = next(line for line in out.splitlines() if line.startswith('| device '))
    if name == 'main-fp32':
        assert 'precision fp32' in header
        assert 'loss scale' not in ''.join(line for line in out.splitlines() if LOSS_RE.match(line))
    elif name == 'main-fp16':
        assert 'manual fp32 master weights, static loss scale 128' in header
        assert all('| loss scale 128 |' in line for line in out.splitlines() if LOSS_RE.match(line))
    else:
        assert re.search(r"FP16_Optimizer from (apex\.fp16_utils|this example's fp16_utils)", header), header
        if name == 'fp16opt-static':
            assert 'static loss scale 128' in header
            assert 'not finite' not in out
        else:
            assert 'dynamic loss scale' in header
            # starts at 2**32, which overflows fp16 gradients: the first updates are skipped, the scale halves
            assert re.search(r'not finite at loss scale 4\.29497e\+09.*skipped \(1 so far\)', out), out
            assert re.search(r'not finite at loss scale 2\.14748e\+09.*skipped \(2 so far\)', out), out
            scales = [float(x) for x in re.findall(r'\| loss scale (\S+) \|', out)]
            assert scales and 1 <= scales[-1] < 2 ** 32 and scales == sorted(scales, reverse=True)


def test_fp32_and_fp16_runs_agree_roughly(training_runs):
    """fp16 with fp32 masters tracks fp32 training: the test losses are close."""
    results = {}
    for name in ('main-fp32', 'main-fp16', 'fp16opt-static'):
        proc, _ = training_runs(name)
        assert proc.returncode == 0
        results[name] = float(END_RE.search(proc.stdout).group(1))
    assert abs(results['main-fp16'] - results['main-fp32']) < 0.1, results
    assert abs(results['fp16opt-static'] - results['main-fp32']) < 0.1, results


def test_sigint_stops_training_cleanly(tmp_path, corpus_dir):
    args = [sys.executable, str(REPO / 'main.py'), '--data', str(corpus_dir), *map(str, TRAIN_ARGS)]
    args[args.index('--epochs') + 1] = '1000'
    env = dict(os.environ, PYTHONUNBUFFERED='1', CUDA_VISIBLE_DEVICES='', **ENV)
    proc = subprocess.Popen(args, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith('| end of epoch'):
                break
        assert any(line.startswith('| end of epoch') for line in seen), ''.join(seen)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=90)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = ''.join(seen) + rest
    assert proc.returncode == 0, out
    assert 'Traceback' not in out and 'KeyboardInterrupt' not in out
    assert 'stopping after this batch' in out
    assert 'Exiting from training early' in out
    m = END_RE.search(out)
    assert m, out
    assert math.isfinite(float(m.group(1)))
    assert out.count('| end of epoch') < 1000
    assert (tmp_path / 'model.pt').is_file()  # the best model of the finished epoch(s)


# ---------------------------------------------------------------- generate.py

@pytest.fixture(scope='module')
def fp16_checkpoint(training_runs):
    proc, cwd = training_runs('main-fp16')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return cwd / 'model.pt'


def test_generate_words(tmp_path, fp16_checkpoint):
    proc = run_script('generate.py', '--checkpoint', fp16_checkpoint, '--words', 57, '--outf', 'out.txt',
                      cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / 'out.txt').read_text(encoding='utf-8')
    lines = text.splitlines()
    assert [len(line.split()) for line in lines] == [20, 20, 17]
    vocab = checkpoint.load(str(fp16_checkpoint))['vocab']
    padding_words = {vocab['idx2word'][i] for i in vocab['padding']}
    assert padding_words  # the tiny vocabulary was padded: the check below means something
    words = text.split()
    assert len(words) == 57
    assert set(words) <= set(vocab['idx2word'])
    assert not set(words) & padding_words
    assert not list(tmp_path.glob('.*.tmp'))


def test_generate_never_samples_padding(tmp_path, fp16_checkpoint):
    # At a high temperature the distribution is nearly uniform: unmasked padding would show up.
    proc = run_script('generate.py', '--checkpoint', fp16_checkpoint, '--words', 600, '--temperature', 100,
                      '--outf', 'hot.txt', cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr
    vocab = checkpoint.load(str(fp16_checkpoint))['vocab']
    padding_words = {vocab['idx2word'][i] for i in vocab['padding']}
    words = (tmp_path / 'hot.txt').read_text(encoding='utf-8').split()
    assert len(words) == 600
    assert not set(words) & padding_words
    real = set(vocab['idx2word']) - padding_words
    assert len(set(words)) > len(real) // 2  # high temperature: many different words


def test_generate_temperature_zero(tmp_path, fp16_checkpoint):
    proc = run_script('generate.py', '--checkpoint', fp16_checkpoint, '--temperature', 0, '--outf', 'out.txt',
                      cwd=tmp_path, env=ENV)
    assert proc.returncode == 2
    assert_clean_error(proc, '--temperature')
    assert not (tmp_path / 'out.txt').exists()


def test_generate_missing_checkpoint(tmp_path):
    proc = run_script('generate.py', '--checkpoint', 'no-such-model.pt', '--outf', 'out.txt', cwd=tmp_path, env=ENV)
    assert_clean_error(proc, 'no-such-model.pt')
    assert not (tmp_path / 'out.txt').exists()


@pytest.mark.parametrize('kind', ['text', 'binary-junk', 'truncated', 'pickled-module', 'foreign-dict'])
def test_generate_unusable_checkpoint(tmp_path, fp16_checkpoint, kind):
    bad = tmp_path / 'bad.pt'
    if kind == 'text':
        bad.write_bytes(b'hello world\n')  # e.g. a text file passed by mistake
    elif kind == 'binary-junk':
        bad.write_bytes(b'this is not a checkpoint\x00' * 10)
    elif kind == 'truncated':
        good = fp16_checkpoint.read_bytes()
        bad.write_bytes(good[:len(good) // 2])
    elif kind == 'pickled-module':
        torch.save(torch.nn.Linear(2, 2), bad)  # what the original example saved: refused under weights_only
    else:
        torch.save({'model': {}}, bad)
    proc = run_script('generate.py', '--checkpoint', 'bad.pt', '--outf', 'out.txt', cwd=tmp_path, env=ENV)
    assert_clean_error(proc, 'bad.pt')
    assert not (tmp_path / 'out.txt').exists()


# ---------------------------------------------------------------- bad input to the training scripts

def test_main_missing_data_dir(tmp_path):
    missing = tmp_path / 'no-such-dir'
    proc = run_script('main.py', '--data', missing, *TRAIN_ARGS, cwd=tmp_path, env=ENV)
    assert_clean_error(proc, str(missing))
    assert not (tmp_path / 'model.pt').exists()


def test_main_bad_corpus_file(tmp_path, corpus_dir):
    bad = tmp_path / 'bad'
    bad.mkdir()
    for split in ('train', 'valid'):
        (bad / f'{split}.txt').write_bytes((corpus_dir / f'{split}.txt').read_bytes())
    (bad / 'test.txt').write_bytes(b'ok words\nnot \xff utf-8\n')
    proc = run_script('main_fp16_optimizer.py', '--data', bad, *TRAIN_ARGS, cwd=tmp_path, env=ENV)
    assert_clean_error(proc, str(bad / 'test.txt'), 'UTF-8')


def test_main_cuda_without_cuda(tmp_path, corpus_dir):
    proc = run_script('main.py', '--data', corpus_dir, *TRAIN_ARGS, '--cuda', cwd=tmp_path, env=ENV)
    assert_clean_error(proc, '--cuda')
    assert 'CUDA' in proc.stderr
