"""SAVE.metrics.jsonl: the records of a run, and of a run stopped or killed and resumed (none lost, none twice)."""
import json
import os
import re
import signal
import sys

import pytest
import torch
from test_robustness import SMALL

import training
from conftest import ENV, describe, error_line, run_script
from plumbing import signals

TIMINGS = {'elapsed', 'ms_per_batch', 'tokens_per_s', 'epoch_seconds'}  # differ from run to run
FIELDS = {
    'run': {'kind', 'script', 'flags', 'recipe', 'precision', 'torch', 'device', 'processes', 'batches_per_epoch',
            'epoch', 'batch', 'resumed', 'elapsed'},
    'train': {'kind', 'epoch', 'batch', 'step', 'lr', 'loss', 'ppl', 'ms_per_batch', 'tokens_per_s', 'loss_scale',
              'skipped', 'elapsed'},
    'epoch': {'kind', 'epoch', 'valid_loss', 'valid_ppl', 'epoch_seconds', 'best', 'lr', 'skipped', 'elapsed'},
    'end': {'kind', 'test_loss', 'test_ppl', 'stopped', 'epoch', 'batch', 'best_val_loss', 'skipped', 'elapsed'},
}


def records(directory):
    return [json.loads(line) for line in (directory / 'model.pt.metrics.jsonl').read_text().splitlines()]


def without_timings(recs):
    """The records but the run records, timings left out: what a resumed run must repeat exactly."""
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in recs if r['kind'] != 'run']


def test_a_run_writes_a_record_per_progress_line_epoch_and_test(tmp_path, call_script, corpus_dir):
    proc = call_script('main.py', '--data', corpus_dir, *SMALL, '--epochs', 2, '--fp16', cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    recs = records(tmp_path)
    for r in recs:
        assert set(r) == FIELDS[r['kind']], r
    run, *rest, end = recs
    assert run['kind'] == 'run' and end['kind'] == 'end'
    assert run['recipe'] == 'fp16-manual' and run['torch'] == torch.__version__ and run['script'] == 'main.py'
    assert run['flags']['epochs'] == 2 and run['flags']['fp16'] is True and run['resumed'] is False
    assert 'cores' in run['device']

    lines = re.findall(r'^\| epoch +(\d+) \| +(\d+)/ *(\d+) batches .*\| loss +([\d.]+) \|.*\| loss scale (\S+)',
                       proc.stdout, re.M)
    train = [r for r in recs if r['kind'] == 'train']
    assert len(train) == len(lines) > 2
    for r, (epoch, batch, nbatches, loss, scale) in zip(train, lines):
        assert (r['epoch'], r['batch'], f"{r['loss']:5.2f}".strip(), r['loss_scale']) == (
            int(epoch), int(batch), loss, float(scale))
        assert r['step'] == (r['epoch'] - 1) * int(nbatches) + r['batch'] and int(nbatches) == run['batches_per_epoch']
        assert r['ppl'] == pytest.approx(2.718281828 ** r['loss'])

    epochs = [r for r in recs if r['kind'] == 'epoch']
    valid = re.findall(r'\| valid ppl +([\d.]+)', proc.stdout)
    assert [f"{r['valid_ppl']:.2f}" for r in epochs] == valid and [r['epoch'] for r in epochs] == [1, 2]
    assert epochs[0]['best'] is True and epochs[1]['best'] == (epochs[1]['valid_loss'] < epochs[0]['valid_loss'])
    assert epochs[1]['lr'] == (5.0 if epochs[1]['best'] else 1.25)  # after annealing
    assert f"{end['test_ppl']:.2f}" == re.search(r'test ppl +([\d.]+)', proc.stdout).group(1)
    assert end['stopped'] is False and end['best_val_loss'] == min(r['valid_loss'] for r in epochs)
    times = [r['elapsed'] for r in recs]
    assert times == sorted(times)


def second_signal_at(n):
    """A train_batch that raises the second Ctrl-C's exception at call n: the run dies at once, saving nothing."""
    real, calls = training.train_batch, []

    def train_batch(*args):
        calls.append(1)
        if len(calls) == n:
            raise signals.SecondSignal(signal.SIGINT)
        return real(*args)
    return train_batch


def sigint_after(n):
    """A train_batch that sends SIGINT after call n: the run stops after that batch and saves SAVE.resume."""
    real, calls = training.train_batch, []

    def train_batch(*args):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args)
    return train_batch


@pytest.mark.parametrize('how, exit_code', [
    ('stopped mid-epoch 2', 0),  # SAVE.resume at the stop; the stopped run's test record is dropped
    ('killed mid-epoch 2', 130),  # SAVE.resume from epoch 1's end; the records after it are written again
])
def test_a_resumed_run_has_the_records_of_one_never_stopped(how, exit_code, tmp_path, call_script, corpus_dir,
                                                            monkeypatch):
    flags = ['--data', corpus_dir, *SMALL, '--epochs', 3, '--fp16']
    (tmp_path / 'whole').mkdir()
    whole = call_script('main.py', *flags, cwd=tmp_path / 'whole')
    assert whole.returncode == 0, describe(whole)
    nbatches = records(tmp_path / 'whole')[0]['batches_per_epoch']

    train_batch = (sigint_after if how.startswith('stopped') else second_signal_at)(nbatches + 12)
    with monkeypatch.context() as m:
        m.setattr(training, 'train_batch', train_batch)
        first = call_script('main.py', *flags, cwd=tmp_path)
    assert first.returncode == exit_code, describe(first)
    before = records(tmp_path)
    assert any(r['kind'] == 'train' and r['epoch'] == 2 for r in before)  # records the resumed run writes again
    resumed = call_script('main.py', *flags, '--resume', 'model.pt.resume', cwd=tmp_path)
    assert resumed.returncode == 0, describe(resumed)

    recs = records(tmp_path)
    assert without_timings(recs) == without_timings(records(tmp_path / 'whole'))
    runs = [r for r in recs if r['kind'] == 'run']
    assert [r['resumed'] for r in runs] == [False, True]
    assert (runs[1]['epoch'], runs[1]['batch']) == ((2, 12) if how.startswith('stopped') else (2, 0))
    times = [r['elapsed'] for r in recs]
    assert times == sorted(times)  # the clock goes on from where SAVE.resume left it


def test_a_resume_without_the_metrics_file_starts_one_and_says_so(tmp_path, call_script, corpus_dir):
    flags = ['--data', corpus_dir, *SMALL, '--epochs', 2]
    assert call_script('main.py', *flags[:-1], 1, cwd=tmp_path).returncode == 0
    (tmp_path / 'model.pt.metrics.jsonl').unlink()
    proc = call_script('main.py', *flags, '--resume', 'model.pt.resume', cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert '| model.pt.metrics.jsonl is missing or shorter than the ' in proc.stdout
    recs = records(tmp_path)
    assert recs[0]['kind'] == 'run' and recs[0]['resumed'] is True and recs[0]['epoch'] == 2
    assert [r['epoch'] for r in recs if r['kind'] == 'epoch'] == [2]


# ---------------------------------------------------------------- plot.py

@pytest.fixture(scope='module')
def two_runs(tmp_path_factory, corpus_dir):
    """Metrics files of an fp32 run and an FP16_Optimizer dynamic-scale run, 2 epochs each."""
    directory = tmp_path_factory.mktemp('two-runs')
    for script, flags, save in (('main.py', [], 'fp32.pt'),
                                ('main_fp16_optimizer.py', ['--fp16', '--dynamic-loss-scale'], 'dyn.pt')):
        proc = run_script(script, '--data', corpus_dir, *SMALL, '--epochs', 2, *flags, '--save', save,
                          cwd=directory, env=ENV)
        assert proc.returncode == 0, describe(proc)
    return directory


def test_plot_draws_a_png_from_two_metrics_files(two_runs, call_script):
    pytest.importorskip('matplotlib')
    proc = call_script('plot.py', 'fp32.pt.metrics.jsonl', 'dyn.pt.metrics.jsonl', '--out', 'curves.png',
                       cwd=two_runs)
    assert proc.returncode == 0, describe(proc)
    assert '| wrote curves.png: 2 run(s)' in proc.stdout
    png = (two_runs / 'curves.png').read_bytes()
    assert png.startswith(b'\x89PNG\r\n\x1a\n') and len(png) > 20_000


def test_plot_labels_runs_with_their_recipe_and_scale(two_runs):
    import plot
    labels = [plot.label(plot.read_run(two_runs / name)) for name in ('fp32.pt.metrics.jsonl', 'dyn.pt.metrics.jsonl')]
    assert labels == ['fp32', 'fp16-optimizer-dynamic']
    run = plot.read_run(two_runs / 'fp32.pt.metrics.jsonl')
    run[0]['recipe'], run[0]['flags']['static_loss_scale'] = 'fp16-manual', 128.0
    assert plot.label(run) == 'fp16-manual, scale 128'


@pytest.mark.parametrize('content, sentence', [
    ('{"kind": "train"}\n', 'does not start with a run record; is it a SAVE.metrics.jsonl file?'),
    ('| epoch 1 | ...\n', 'line 1 is not a JSON record; is it a SAVE.metrics.jsonl file?'),
    ('', 'does not start with a run record; is it a SAVE.metrics.jsonl file?'),
])
def test_plot_refuses_a_file_that_is_not_a_metrics_file(content, sentence, tmp_path, call_script):
    pytest.importorskip('matplotlib')
    (tmp_path / 'bad.jsonl').write_text(content)
    proc = call_script('plot.py', 'bad.jsonl', cwd=tmp_path)
    assert error_line(proc, 'plot.py', 1) == f'plot.py: error: bad.jsonl {sentence}', describe(proc)
    assert not (tmp_path / 'curves.png').exists()


def test_plot_without_matplotlib_says_what_to_install(two_runs, call_script, monkeypatch):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # `import matplotlib` raises ImportError
    proc = call_script('plot.py', 'fp32.pt.metrics.jsonl', '--out', 'none.png', cwd=two_runs)
    assert proc.returncode == 2, describe(proc)
    assert error_line(proc, 'plot.py', 2) == ('plot.py: error: plot.py needs matplotlib, which is not installed: '
                                              'pip install -r requirements-plot.txt')


def test_metrics_table_has_a_row_per_finished_run(two_runs, capsys):
    from benchmarks import metrics_table
    files = [str(two_runs / name) for name in ('fp32.pt.metrics.jsonl', 'dyn.pt.metrics.jsonl')]
    assert metrics_table.main(files) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [r.split(' | ')[0] for r in rows] == ['| fp32', '| fp16-optimizer-dynamic']
    for row, path in zip(rows, files):
        recs = [json.loads(line) for line in open(path)]
        end = recs[-1]
        cells = row.strip('| ').split(' | ')
        assert cells[1] == '2' and cells[3] == f"{end['test_ppl']:.2f}" and cells[6] == str(end['skipped'])
