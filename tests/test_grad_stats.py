"""grad_stats.py: fp16's classes counted at the edges they are defined by, the activations' gradients
hooked once each, a run on a tiny model and corpus, one sentence for bad flags, and the picture."""
import argparse
import math
import re
import subprocess
import sys

import pytest
import torch

import data
import grad_stats
from conftest import ENV, REPO, describe, error_line, make_tiny_corpus, run_script
from model import RNNModel
from plumbing import checkpoint, cli, wikitext

SCALES = (1.0, 128.0, 65536.0)
SUBNORMAL, NORMAL, MAX = 2.0 ** -24, 2.0 ** -14, 65504.0


def below(x):
    """The fp32 number before x."""
    return torch.nextafter(torch.tensor(x, dtype=torch.float32), torch.tensor(-math.inf)).item()


def above(x):
    return torch.nextafter(torch.tensor(x, dtype=torch.float32), torch.tensor(math.inf)).item()


@pytest.mark.parametrize('scale', SCALES)
def test_counts_at_fp16s_edges(scale):
    # Each edge of |g * scale|, the fp32 number on either side of it, and both signs.
    flushed = [below(SUBNORMAL / scale), 2.0 ** -149]
    subnormal = [SUBNORMAL / scale, below(NORMAL / scale)]
    normal = [NORMAL / scale, MAX / scale]
    overflow = [above(MAX / scale), math.inf, math.nan]
    values = torch.tensor([0.0, -0.0, *flushed, *subnormal, *normal, *overflow])
    values = torch.cat([values, -values])
    counts = grad_stats.fp16_counts(values, [scale])
    assert counts == {scale: {'zero': 4, 'flushed': 4, 'subnormal': 4, 'normal': 4, 'overflow': 6}}


def test_counts_match_a_direct_count_at_every_scale():
    torch.manual_seed(0)
    values = torch.randn(200_000) * 2.0 ** torch.randint(-45, 25, (200_000,)).float()
    values[::5] = 0
    scales = [1.0, 8.0, 128.0, 1024.0, 65536.0, 2.0 ** 40]
    counts = grad_stats.fp16_counts(values, scales)
    for scale in scales:
        scaled, zero = values.abs() * scale, values == 0
        direct = {'zero': zero, 'flushed': (scaled < SUBNORMAL) & ~zero,
                  'subnormal': (scaled >= SUBNORMAL) & (scaled < NORMAL),
                  'normal': (scaled >= NORMAL) & (scaled <= MAX), 'overflow': scaled > MAX}
        assert counts[scale] == {name: int(mask.sum()) for name, mask in direct.items()}


def test_tally_shares_and_percentiles_over_several_gradients():
    tally = grad_stats.Tally([1.0, 128.0])
    tally.add(torch.tensor([2.0 ** -30, 2.0 ** -20, 0.0, 0.0]))  # flushed and subnormal at 1
    tally.add(torch.tensor([[2.0 ** -10, 2.0 ** 20]]))  # normal at 1; overflow at 128 (2**27)
    assert (tally.values, tally.nonzero) == (6, 4)
    assert tally.shares(1.0) == {'flushed': 0.25, 'subnormal': 0.25, 'normal': 0.25, 'overflow': 0.25}
    assert tally.shares(128.0) == {'flushed': 0.0, 'subnormal': 0.25, 'normal': 0.5, 'overflow': 0.25}
    assert (tally.log2_min, tally.log2_max) == (-30, 20)
    # A percentile is the middle of its 1/8-wide bin, within the smallest and largest value.
    assert [tally.log2_percentile(p) for p in (1, 25, 50, 99)] == [-29.9375, -29.9375, -19.9375, 20]
    one_value = grad_stats.Tally([1.0])
    one_value.add(torch.tensor([2.0 ** -29.78]))  # in the bin from -29.875 to -29.75, above its middle
    assert one_value.log2_percentile(50) == one_value.log2_min == pytest.approx(-29.78)


@pytest.mark.parametrize('dropout', [0.0, 0.3])
def test_each_activation_gradient_is_hooked_once(dropout):
    """The logits' gradient reaches its tally as autograd computes it; with dropout 0 the RNN's input is the
    embedding's output, one tensor whose gradient is counted once."""
    torch.manual_seed(0)
    model = RNNModel('LSTM', 24, 8, 8, 2, dropout=dropout)
    activations = grad_stats.ActivationGrads(model, [1.0])
    inputs, targets = torch.randint(24, (5, 3)), torch.randint(24, (15,))
    logits, _ = model(inputs, model.init_hidden(3))
    logits.retain_grad()
    torch.nn.functional.cross_entropy(logits.view(-1, 24), targets).backward()
    tallies = activations.tallies
    assert tallies['logits'].counts == grad_stats.fp16_counts(logits.grad, [1.0])
    values = {name: tally.values for name, tally in tallies.items()}
    dropped = 0 if dropout == 0 else 5 * 3 * 8
    assert values == {'embedding output': 5 * 3 * 8, 'RNN input': dropped, 'RNN output': 5 * 3 * 8,
                      'decoder input': dropped, 'logits': 5 * 3 * 24}


# ---------------------------------------------------------------- the script

@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A tiny corpus and the best-model checkpoint of an untrained 16-unit LSTM over its words, saved with
    batch size 4 and bptt 6 as its training flags."""
    directory = tmp_path_factory.mktemp('grad_stats')
    corpus_dir = make_tiny_corpus(directory / 'corpus')
    dictionary = data.Corpus(corpus_dir, pad_to_multiple_of=8).dictionary
    torch.manual_seed(0)
    model = RNNModel('LSTM', len(dictionary), 16, 16, 2, dropout=0.2)
    flags = argparse.Namespace(batch_size=4, bptt=6)
    checkpoint.save(checkpoint.model_checkpoint(model, dictionary, flags, best_val_loss=5.0), directory / 'model.pt')
    return argparse.Namespace(dir=directory, data=corpus_dir, checkpoint=directory / 'model.pt')


@pytest.fixture
def grad_stats_run(monkeypatch, capsys):
    """run(*args): grad_stats.main(args) through cli.run in this process, as `python grad_stats.py ARGS` would,
    with no CUDA device; argparse's own errors give their exit code. Returns a CompletedProcess."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.accelerator, 'is_available', lambda: False)
    monkeypatch.setattr(sys, 'argv', [str(REPO / 'grad_stats.py')])
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    torch.set_num_threads(1)

    def run(*args):
        args = [str(a) for a in args]
        capsys.readouterr()
        try:
            code = cli.guarded_main(grad_stats.main, args)
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(['grad_stats.py', *args], code, out, err)

    yield run
    torch.set_rng_state(rng)
    torch.set_num_threads(threads)


SHARE_ROW = re.compile(r'^ *(\S*)  (weights|activations|  logits|  the others) +((?:\S+ +){3}\S+)$', re.M)


def share_rows(out):
    """{(scale, group): [flushed, subnormal, normal, overflow] as printed}, the scale carried down to its group's rows."""
    rows, scale = {}, None
    for match in SHARE_ROW.finditer(out):
        scale = match[1] or scale
        rows[scale, match[2].strip()] = match[3].split()
    return rows


def test_run_prints_the_table(grad_stats_run, tiny):
    proc = grad_stats_run('--checkpoint', tiny.checkpoint, '--data', tiny.data, '--batches', 3, '--scales', '1,128')
    assert proc.returncode == 0 and 'Traceback' not in proc.stderr and 'error' not in proc.stderr, describe(proc)
    assert "3 batches of 6 x 4 tokens from the start of train (bptt the checkpoint's, batch size the checkpoint's)" \
        in proc.stdout
    rows = share_rows(proc.stdout)
    assert set(rows) == {(scale, group) for scale in ('1', '128')
                         for group in ('weights', 'activations', 'logits', 'the others')}, proc.stdout
    for shares in rows.values():
        printed = [0.0 if s == '0' else float(s.strip('<%')) for s in shares]
        assert sum(printed) == pytest.approx(100, abs=0.01)
    for name in ('encoder.weight', 'decoder.bias', 'embedding output', 'logits'):
        assert re.search(rf'^  {re.escape(name)} +[\d,]+ ', proc.stdout, re.M), proc.stdout


def test_flags_override_the_checkpoints_batch_shape(grad_stats_run, tiny):
    proc = grad_stats_run('--checkpoint', tiny.checkpoint, '--data', tiny.data, '--batches', 1,
                          '--batch_size', 2, '--bptt', 3, '--split', 'valid')
    assert proc.returncode == 0, describe(proc)
    assert '1 batches of 3 x 2 tokens from the start of valid (bptt --bptt, batch size --batch_size)' in proc.stdout


@pytest.mark.parametrize('args, needle', [
    (['--batches', 0], '--batches must be at least 1'),
    (['--bptt', -1], '--bptt must be at least 1'),
    (['--scales', '1,0.5'], '--scales must be numbers from 1 to 2**64'),
    (['--scales', '1,,8'], '--scales must be numbers'),
    (['--scales', 'inf'], '--scales must be numbers'),
    (['--split', 'dev'], "invalid choice: 'dev'"),
    (['--checkpoint', 'missing.pt'], '--checkpoint missing.pt: no such file'),
    (['--data', 'nowhere'], '--data nowhere: no such directory'),
    (['--batch_size', 10 ** 6], '--batch_size 1000000 is too large for the train split'),
    (['--cuda'], '--cuda was given but no CUDA device is available'),
])
def test_bad_flags_are_one_sentence(grad_stats_run, tiny, args, needle):
    defaults = {'--checkpoint': tiny.checkpoint, '--data': tiny.data}
    for flag in args[::2]:
        defaults.pop(flag, None)
    proc = grad_stats_run(*[x for pair in defaults.items() for x in pair], *args)
    assert needle in error_line(proc, 'grad_stats.py', 2)


def test_words_the_vocabulary_lacks_are_an_error(grad_stats_run, tiny, tmp_path):
    other = tmp_path / 'other'
    other.mkdir()
    for split in wikitext.SPLITS:
        (other / f'{split}.txt').write_text((tiny.data / f'{split}.txt').read_text())
    with open(other / 'train.txt', 'a') as f:
        f.write('w1 unseenword w2\n')
    proc = grad_stats_run('--checkpoint', tiny.checkpoint, '--data', other)
    line = error_line(proc, 'grad_stats.py', 1)
    assert "has words that the checkpoint's vocabulary lacks (1 different; the first: 'unseenword')" in line


def test_bad_flag_from_the_command_line(tiny):
    """The script's __main__ goes through cli.run: one sentence, no traceback."""
    proc = run_script('grad_stats.py', '--checkpoint', tiny.checkpoint, '--scales', 'x', cwd=tiny.dir, env=ENV)
    assert '--scales must be numbers' in error_line(proc, 'grad_stats.py', 2)


def test_out_draws_a_png(grad_stats_run, tiny):
    pytest.importorskip('matplotlib')
    out = tiny.dir / 'grad_stats.png'
    proc = grad_stats_run('--checkpoint', tiny.checkpoint, '--data', tiny.data, '--batches', 2, '--scales', 8,
                          '--out', out)
    assert proc.returncode == 0, describe(proc)
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert f'written to {out}' in proc.stdout
    # The picture's scales 1 and 128 are counted, and printed, beside the one asked for.
    assert {scale for scale, _ in share_rows(proc.stdout)} == {'1', '8', '128'}


def test_out_without_matplotlib_says_what_to_install(grad_stats_run, tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # `import matplotlib` raises ImportError
    out = tiny.dir / 'never.png'
    proc = grad_stats_run('--checkpoint', tiny.checkpoint, '--data', tiny.data, '--out', out)
    assert 'pip install -r requirements-plot.txt' in error_line(proc, 'grad_stats.py', 2)
    assert not out.exists()
