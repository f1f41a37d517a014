"""Issue 20, unit level: every file a run touches is guarded (locks, the metrics file), every file it
reads is checked (metrics files, checkpoints, data, torchrun's variables, memory limits)."""
import itertools
import json
import math
import os
import resource

import pytest
import torch

from conftest import make_tiny_corpus
from model import RNNModel
from plumbing import checkpoint, cli, distributed, metrics, wikitext
from plumbing.errors import CheckpointError, DataError, SaveInUse, UsageError
from plumbing.files import SaveLock

# ---------------------------------------------------------------- class 1: lock files, the metrics file


@pytest.mark.parametrize('kind', ['symlink', 'directory', 'fifo', 'hard link'])
def test_a_lock_file_that_is_not_a_regular_file_of_its_own_is_refused(kind, tmp_path):
    lock, victim = tmp_path / '.model.pt.lock', tmp_path / 'victim.txt'
    victim.write_text('the user\'s file\n')
    {'symlink': lambda: lock.symlink_to(victim), 'directory': lock.mkdir, 'fifo': lambda: os.mkfifo(lock),
     'hard link': lambda: os.link(victim, lock)}[kind]()
    with pytest.raises(UsageError) as e:
        with SaveLock(str(tmp_path / 'model.pt')):
            pass
    assert str(e.value).startswith(f'{lock}, the lock file of --save ') and str(e.value).endswith('; remove it.')
    assert victim.read_text() == 'the user\'s file\n'
    assert os.path.lexists(lock)  # left as it was


def test_the_lock_covers_every_file_the_run_writes(tmp_path):
    save = str(tmp_path / 'x.pt')
    with SaveLock(save, others=[('SAVE.resume', save + '.resume')]):
        # A run with --save x.pt.resume would write x.pt.resume, which this run writes.
        with pytest.raises(SaveInUse, match=r'--save .*x\.pt\.resume is in use by another run \(process \d+\)'):
            with SaveLock(save + '.resume'):
                pass
    with SaveLock(save + '.resume'):
        pass
    assert not list(tmp_path.glob('.*.lock'))


def test_the_metrics_file_never_writes_into_a_hard_link(tmp_path):
    path, user = tmp_path / 'model.pt.metrics.jsonl', tmp_path / 'notes.txt'
    user.write_text('my notes\n')
    os.link(user, path)
    with metrics.MetricsFile(str(path)) as m:
        m.write('run', x=1)
    assert user.read_text() == 'my notes\n'
    # A resume that keeps the records copies them into a new file as well.
    kept = path.read_bytes()
    os.unlink(user)
    os.link(path, user)
    with metrics.MetricsFile(str(path), len(kept), 0.0, __import__('hashlib').sha256(kept).hexdigest()) as m:
        m.write('train', y=2)
    assert user.read_bytes() == kept
    assert [json.loads(line)['kind'] for line in path.read_text().splitlines()] == ['run', 'train']


# ---------------------------------------------------------------- class 3: the metrics file is this run's

def written(path, *kinds, value=1.5):
    with metrics.MetricsFile(str(path)) as m:
        for kind in kinds:
            m.write(kind, value=value)
        return m.size(), m.digest()


def test_a_metrics_file_cut_mid_record_is_started_anew(tmp_path):
    path = tmp_path / 'm.jsonl'
    size, digest = written(path, 'run', 'train', 'train')
    path.write_bytes(path.read_bytes()[:size - 7])  # cut inside the last record
    with metrics.MetricsFile(str(path), size, 0.0, digest) as m:
        m.write('run', resumed=True)
    assert m.note is not None and 'shorter than the' in m.note
    assert [json.loads(line)['kind'] for line in path.read_text().splitlines()] == ['run']


def test_a_longer_metrics_file_of_another_run_is_not_trusted_by_its_length(tmp_path):
    path = tmp_path / 'm.jsonl'
    size, digest = written(path, 'run', 'train')
    other = tmp_path / 'other.jsonl'
    written(other, 'run', 'train', 'train', 'epoch', value=2.5)  # another run on the same --save, killed later
    os.replace(other, path)
    with metrics.MetricsFile(str(path), size, 0.0, digest) as m:
        m.write('run', resumed=True)
    assert "another run's records" in m.note
    assert [json.loads(line)['kind'] for line in path.read_text().splitlines()] == ['run']


def test_the_metrics_file_of_this_run_is_kept_and_continued(tmp_path):
    path = tmp_path / 'm.jsonl'
    size, digest = written(path, 'run', 'train')
    with open(path, 'a') as f:
        f.write('{"kind": "train", "after": "the save"}\n')  # written after SAVE.resume: dropped
    with metrics.MetricsFile(str(path), size, 0.0, digest) as m:
        m.write('epoch')
    assert m.note is None
    assert [json.loads(line)['kind'] for line in path.read_text().splitlines()] == ['run', 'train', 'epoch']


def test_the_metrics_file_holds_json_only(tmp_path):
    path = tmp_path / 'm.jsonl'
    with metrics.MetricsFile(str(path)) as m:
        m.write('train', ppl=math.inf, loss=math.nan, flags={'lr': math.inf})
    assert 'Infinity' not in path.read_text() and 'NaN' not in path.read_text()
    record = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f'{c} is not JSON'))
    assert record['ppl'] is None and record['loss'] is None and record['flags'] == {'lr': None}


# ---------------------------------------------------------------- class 4: inputs read as sentences

def metrics_lines(*records):
    return ''.join(json.dumps(r) + '\n' for r in records)


RUN = {'kind': 'run', 'recipe': 'fp32', 'flags': {}, 'device': 'cpu', 'batches_per_epoch': 3, 'elapsed': 0.1}


@pytest.mark.parametrize('content, sentence', [
    (b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe', 'is not a text file (not UTF-8)'),
    (b'PK\x03\x04\x14\x00\x00\x00\x08\x00\xc3\xa9\x9f\x80', 'is not a text file (not UTF-8)'),
    (metrics_lines(RUN, {'kind': 'train', 'epoch': 1, 'elapsed': 1.0}).encode(),
     'line 2: its train record has no batch and no step and no ppl and no loss_scale.'),
    (metrics_lines({**RUN, 'batches_per_epoch': 0}).encode(),
     "line 1: its run record's batches_per_epoch is not what training writes."),
    (metrics_lines({k: v for k, v in RUN.items() if k != 'recipe'}).encode(), 'line 1: its run record has no recipe.'),
])
def test_plot_reads_only_metrics_files(content, sentence, tmp_path):
    path = tmp_path / 'bad.jsonl'
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        metrics.read_run(str(path))
    assert str(e.value) == f'{path} {sentence}' or str(e.value).startswith(f'{path} {sentence}'), str(e.value)


def test_a_checkpoint_with_nan_weights_is_refused_when_loaded(tmp_path):
    model = RNNModel('LSTM', 8, 4, 4, 1)
    with torch.no_grad():
        model.decoder.weight[0, 0] = math.nan
    dictionary = type('D', (), {'idx2word': [f'w{i}' for i in range(8)], 'padding': []})()
    args = type('A', (), {})()
    checkpoint.save(checkpoint.model_checkpoint(model, dictionary, args, 1.0), str(tmp_path / 'nan.pt'))
    with pytest.raises(CheckpointError, match=r"its weight 'decoder.weight' holds inf or NaN values"):
        checkpoint.load_model(str(tmp_path / 'nan.pt'))


def test_the_cpu_memory_check_reads_the_process_limits(monkeypatch):
    real = resource.getrlimit
    limit = 3 * 2 ** 30
    monkeypatch.setattr(resource, 'getrlimit', lambda r: (limit, limit) if r == resource.RLIMIT_AS else real(r))
    assert cli.cpu_memory_limit()[0] <= limit

    class Args:
        model, emsize, nhid, nlayers, dropout, tied = 'LSTM', 12000, 12000, 2, 0.0, False
    with pytest.raises(UsageError, match=r'more than the 3 GiB of this process \(ulimit -v\)'):
        cli.check_model_size(Args, 100, torch.device('cpu'))


@pytest.mark.parametrize('environment, sentence', [
    ({'WORLD_SIZE': 'abc'}, 'WORLD_SIZE=abc in the environment is not a whole number'),
    ({'WORLD_SIZE': '0'}, 'do not describe a process of torchrun'),
    ({'WORLD_SIZE': '1', 'RANK': '3'}, 'do not describe a process of torchrun'),
    ({'WORLD_SIZE': '2', 'RANK': '0'}, 'MASTER_ADDR and MASTER_PORT are not set'),
    ({'WORLD_SIZE': '2', 'RANK': '0', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': '1', 'WORD_LM_PEER_TIMEOUT': '-1'},
     'WORD_LM_PEER_TIMEOUT=-1 in the environment must be a positive number of seconds'),
])
def test_torchruns_variables_without_torchrun_are_a_sentence(environment, sentence, monkeypatch):
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'WORD_LM_PEER_TIMEOUT'):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UsageError, match=sentence):
        distributed.World().start(torch.device('cpu'))


# ---------------------------------------------------------------- class 6: every run drawn

def test_plot_draws_every_run_with_a_legend_entry(tmp_path, monkeypatch):
    pytest.importorskip('matplotlib')
    import plot
    from matplotlib.figure import Figure
    assert len(list(itertools.islice(plot.color_cycle(), 200))) == 200
    drawn = []
    monkeypatch.setattr(Figure, 'savefig', lambda self, *a, **k: drawn.append(self))
    train = {'kind': 'train', 'epoch': 1, 'batch': 1, 'step': 1, 'ppl': 50.0, 'loss_scale': None, 'elapsed': 1.0}
    epoch = {'kind': 'epoch', 'epoch': 1, 'valid_ppl': 40.0, 'elapsed': 2.0}
    runs = [(f'run {n}', [RUN, train, epoch]) for n in range(60)]
    plot.draw(runs, str(tmp_path / 'curves.png'))
    figure, = drawn
    by_time, by_epoch, _ = figure.axes
    assert len(by_epoch.lines) == 2 * 60
    assert [t.get_text() for legend in figure.legends for t in legend.get_texts()] == [f'run {n}' for n in range(60)]


# ---------------------------------------------------------------- class 7: smaller ones

def test_a_byte_order_mark_is_not_a_word(tmp_path):
    path = tmp_path / 'train.txt'
    path.write_bytes(b'\xef\xbb\xbfthe cat\nthe dog\n')
    dictionary = type('D', (), {'word2idx': {}, 'idx2word': []})()
    ids = wikitext.token_ids(str(path), dictionary)
    assert dictionary.idx2word == ['the', 'cat', '<eos>', 'dog'] and len(ids) == 6


@pytest.mark.parametrize('kind', ['fifo', 'device'])
def test_a_data_file_that_is_not_a_regular_file_is_named_so(kind, tmp_path):
    corpus = make_tiny_corpus(tmp_path / 'c')
    (corpus / 'valid.txt').unlink()
    if kind == 'fifo':
        os.mkfifo(corpus / 'valid.txt')
    else:
        (corpus / 'valid.txt').symlink_to(os.devnull)
    with pytest.raises(DataError, match=r'valid\.txt is not a regular file \(a FIFO, device or socket\)'):
        wikitext.split_files(str(corpus))


@pytest.mark.parametrize('kind, sentence', [('directory', 'is a directory; give a file.'),
                                            ('fifo', 'is not a regular file (a device, FIFO or socket); give a file.')])
def test_an_input_file_that_is_not_a_file_is_named_so(kind, sentence, tmp_path):
    path = tmp_path / 'model.pt'
    path.mkdir() if kind == 'directory' else os.mkfifo(path)
    with pytest.raises(UsageError) as e:
        cli.check_input_file('--checkpoint', str(path))
    assert str(e.value) == f'--checkpoint {path} {sentence}'


def test_the_same_words_in_another_order_are_said_so():
    assert checkpoint.vocabulary_difference(['a', 'b', 'c'], ['a', 'c', 'b']) == (
        "the vocabulary holds the same 3 words in another order (word 1 was 'b', now 'c'): the words must first "
        'appear in --data in the same order')
    assert checkpoint.vocabulary_difference(['a', 'b'], ['a', 'c']) == (
        'the vocabulary differs (2 words saved, 2 in --data)')


def test_a_loss_scale_that_is_not_a_power_of_2_gets_a_word(tmp_path, capsys):
    corpus = make_tiny_corpus(tmp_path / 'c')
    for scale, warned in ((3.0, True), (1024.0, False), (0.5, False)):
        args = cli.training_parser('x').parse_args(['--data', str(corpus), '--fp16', '--static-loss-scale', str(scale),
                                                     '--save', str(tmp_path / 'm.pt')])
        cli.check_training_args(args)
        assert ('is not a power of 2' in capsys.readouterr().out) == warned
