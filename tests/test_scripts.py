"""End-to-end runs of main.py, main_fp16_optimizer.py and generate.py on a tiny generated corpus;
their bad input (in this process, through cli.run); the files they write and their permissions."""
import math
import os
import re
import signal
import subprocess
import sys
import threading

import pytest
import torch

import data
from conftest import ENV, REPO, describe, error_line, file_mode, run_script, temp_files
from plumbing import checkpoint

TRAIN_ARGS = ['--epochs', 2, '--emsize', 16, '--nhid', 16, '--batch_size', 8, '--bptt', 10,
              '--log-interval', 5, '--save', 'model.pt', '--lr', 5, '--dropout', 0]
ONE_EPOCH = ['--epochs', 1, *TRAIN_ARGS[2:]]

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
            proc = run_script(script, '--data', corpus_dir, *TRAIN_ARGS, *extra, cwd=cwd, env=ENV, umask=0o022)
            cache[name] = (proc, cwd)
        return cache[name]
    return get


def assert_clean_error(proc, script, rc, *needles):
    line = error_line(proc, script, rc)
    for needle in needles:
        assert needle in line, line


@pytest.mark.parametrize('name', list(RUNS))
def test_training_run(name, training_runs, corpus_dir):
    proc, cwd = training_runs(name)
    out = proc.stdout
    assert proc.returncode == 0, describe(proc)
    assert 'Traceback' not in out + proc.stderr and ': error: ' not in proc.stderr, describe(proc)
    assert 'static_loss_scale' not in out  # the warning is for --static-loss-scale without --fp16 only

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
    # an ordinary file's permissions under the run's umask (022), and no temporary file left by the atomic save
    assert sorted(p.name for p in cwd.iterdir()) == ['model.pt', 'model.pt.metrics.jsonl', 'model.pt.resume']
    assert file_mode(ckpt_path) == file_mode(cwd / 'model.pt.resume') == 0o644
    assert not temp_files(cwd)

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
            # starts at apex's 2**16; each skipped update halves it (no growth: that takes 2000 clean updates)
            skips = re.findall(r'^\| gradients are not finite: update skipped \((\d+) so far, loss scale now (\S+)\)$',
                               out, re.M)
            assert [int(n) for n, _ in skips] == list(range(1, len(skips) + 1))
            assert [s for _, s in skips] == [f'{2.0 ** (15 - i):g}' for i in range(len(skips))]  # halves each time
            scales = [float(x) for x in re.findall(r'\| loss scale (\S+) \|', out)]
            assert scales and scales[0] <= 2 ** 16 and scales == sorted(scales, reverse=True)
            assert scales[-1] >= 2.0 ** (16 - len(skips))
            # each periodic line counts the updates skipped so far in its epoch
            counts = [int(n) for n in re.findall(r'^\| epoch +1 \| .*\| skipped (\d+)$', out, re.M)]
            lines = out.splitlines()
            first_periodic = next(i for i, line in enumerate(lines) if LOSS_RE.match(line))
            skipped_before = sum(line.startswith('| gradients are not finite') for line in lines[:first_periodic])
            assert counts[0] == skipped_before and counts[-1] <= len(skips), (counts, len(skips))
    if name != 'fp16opt-dynamic':
        assert 'not finite' not in out
        assert all(line.endswith('| skipped 0') for line in out.splitlines() if LOSS_RE.match(line))


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
                      cwd=tmp_path, env=ENV, umask=0o022)
    assert proc.returncode == 0, describe(proc)
    assert 'Traceback' not in proc.stdout + proc.stderr, describe(proc)
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out.txt']  # no temporary file left
    assert file_mode(tmp_path / 'out.txt') == 0o644


def test_generate_never_samples_padding(tmp_path, fp16_checkpoint):
    # At a high temperature the distribution is nearly uniform: unmasked padding would show up.
    proc = run_script('generate.py', '--checkpoint', fp16_checkpoint, '--words', 600, '--temperature', 100,
                      '--outf', 'hot.txt', cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, describe(proc)
    vocab = checkpoint.load(str(fp16_checkpoint))['vocab']
    padding_words = {vocab['idx2word'][i] for i in vocab['padding']}
    words = (tmp_path / 'hot.txt').read_text(encoding='utf-8').split()
    assert len(words) == 600
    assert not set(words) & padding_words
    real = set(vocab['idx2word']) - padding_words
    assert len(set(words)) > len(real) // 2  # high temperature: many different words


def test_generate_temperature_zero(tmp_path, call_script, fp16_checkpoint):
    proc = call_script('generate.py', '--checkpoint', fp16_checkpoint, '--temperature', 0, '--outf', 'out.txt',
                       cwd=tmp_path)
    assert_clean_error(proc, 'generate.py', 2, '--temperature', '(got 0)')
    assert not (tmp_path / 'out.txt').exists()


def test_generate_missing_checkpoint(tmp_path, call_script):
    proc = call_script('generate.py', '--checkpoint', 'no-such-model.pt', '--outf', 'out.txt', cwd=tmp_path)
    assert_clean_error(proc, 'generate.py', 2, '--checkpoint no-such-model.pt: no such file.')
    assert not (tmp_path / 'out.txt').exists()


@pytest.mark.parametrize('kind', ['text', 'binary-junk', 'truncated', 'pickled-module', 'foreign-dict'])
def test_generate_unusable_checkpoint(tmp_path, call_script, fp16_checkpoint, kind):
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
    proc = call_script('generate.py', '--checkpoint', 'bad.pt', '--outf', 'out.txt', cwd=tmp_path)
    assert_clean_error(proc, 'generate.py', 1, 'bad.pt')
    assert not (tmp_path / 'out.txt').exists()
    assert not temp_files(tmp_path)


# ---------------------------------------------------------------- bad input to the training scripts

def test_main_missing_data_dir(tmp_path, call_script):
    missing = tmp_path / 'no-such-dir'
    proc = call_script('main.py', '--data', missing, *TRAIN_ARGS, cwd=tmp_path)
    assert_clean_error(proc, 'main.py', 2, f'--data {missing}: no such directory.')
    assert not (tmp_path / 'model.pt').exists()


def test_main_bad_corpus_file(tmp_path, call_script, corpus_dir):
    bad = tmp_path / 'bad'
    bad.mkdir()
    for split in ('train', 'valid'):
        (bad / f'{split}.txt').write_bytes((corpus_dir / f'{split}.txt').read_bytes())
    (bad / 'test.txt').write_bytes(b'ok words\nnot \xff utf-8\n')
    proc = call_script('main_fp16_optimizer.py', '--data', bad, *TRAIN_ARGS, cwd=tmp_path)
    assert_clean_error(proc, 'main_fp16_optimizer.py', 1, str(bad / 'test.txt'), 'UTF-8')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['bad']


def test_main_cuda_without_cuda(tmp_path, call_script, corpus_dir):
    proc = call_script('main.py', '--data', corpus_dir, *TRAIN_ARGS, '--cuda', cwd=tmp_path)
    assert_clean_error(proc, 'main.py', 2, '--cuda was given but no CUDA device is available.')
    assert not (tmp_path / 'model.pt').exists()


# ---------------------------------------------------------------- the loss-scale warning

@pytest.mark.parametrize('flags, scale, warned', [
    ([], 1.0, False),
    (['--static-loss-scale', '1'], 1.0, False),
    (['--static-loss-scale', '64'], 1.0, True),
    (['--amp', '--static-loss-scale', '64'], 1.0, True),
    (['--fp16'], 128.0, False),
    (['--fp16', '--static-loss-scale', '64'], 64.0, False),
])
def test_static_loss_scale_warning_and_default(flags, scale, warned, capsys):
    """--static-loss-scale defaults to 128 with --fp16, else 1; a scale the user gave without --fp16
    is reset to 1 with a warning; no warning otherwise."""
    from plumbing import cli
    args = cli.training_parser('test').parse_args(['--data', '.', *flags])
    assert args.static_loss_scale == (float(flags[flags.index('--static-loss-scale') + 1])
                                      if '--static-loss-scale' in flags else None)
    cli.check_training_args(args)
    assert args.static_loss_scale == scale
    out, err = capsys.readouterr()
    warning = ('Warning:  static_loss_scale != 1.0 is only necessary with --fp16. '
               'Resetting static_loss_scale to 1.0')
    assert (warning in out.splitlines()) == warned, out
    assert 'static_loss_scale' not in err
    if not warned:
        assert 'static_loss_scale' not in out


def test_static_loss_scale_without_fp16_warns_and_trains_fp32(tmp_path, call_script, corpus_dir):
    proc = call_script('main_fp16_optimizer.py', '--data', corpus_dir, *ONE_EPOCH, '--static-loss-scale', 64, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    lines = proc.stdout.splitlines()
    warning = next(i for i, line in enumerate(lines) if 'static_loss_scale != 1.0 is only necessary with --fp16' in line)
    header = next(i for i, line in enumerate(lines) if line.startswith('| device '))
    assert warning < header and '| precision fp32 |' in lines[header], proc.stdout
    assert 'loss scale' not in ''.join(line for line in lines if LOSS_RE.match(line))
    assert END_RE.search(proc.stdout)


def test_fp16_static_loss_scale_flag_is_used(tmp_path, call_script, corpus_dir):
    proc = call_script('main.py', '--data', corpus_dir, *ONE_EPOCH, '--fp16', '--static-loss-scale', 64, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert 'static_loss_scale' not in proc.stdout
    assert '| precision fp16, manual fp32 master weights, static loss scale 64 |' in proc.stdout
    periodic = [line for line in proc.stdout.splitlines() if LOSS_RE.match(line)]
    assert periodic and all('| loss scale 64 |' in line for line in periodic)


# ---------------------------------------------------------------- files written follow the umask

def test_written_files_follow_a_strict_umask(tmp_path, corpus_dir):
    """Under umask 077 the files the scripts write are the user's alone (0600), as open() would make them;
    test_training_run and test_generate_words check 0644 under umask 022."""
    proc = run_script('main.py', '--data', corpus_dir, *ONE_EPOCH, cwd=tmp_path, env=ENV, umask=0o077)
    assert proc.returncode == 0, describe(proc)
    proc = run_script('generate.py', '--words', 30, cwd=tmp_path, env=ENV, umask=0o077)  # model.pt -> generated.txt
    assert proc.returncode == 0, describe(proc)
    assert len((tmp_path / 'generated.txt').read_text().split()) == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ['generated.txt', 'model.pt', 'model.pt.metrics.jsonl', 'model.pt.resume']
    assert {name: file_mode(tmp_path / name) for name in ('generated.txt', 'model.pt', 'model.pt.resume')} == \
        {'generated.txt': 0o600, 'model.pt': 0o600, 'model.pt.resume': 0o600}
