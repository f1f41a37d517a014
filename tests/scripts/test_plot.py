"""plot.py and benchmarks/metrics_table.py on the metrics files of two real runs."""
import json
import sys

import pytest

from conftest import ENV, SMALL, describe, error_line, run_script

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
    assert error_line(proc, 'plot.py', 2) == ('plot.py: error: plot.py needs matplotlib, which is not installed: '
                                              'pip install -r requirements-plot.txt'), describe(proc)


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
        assert cells[3] == '2' and cells[5] == f"{end['test_ppl']:.2f}" and cells[8] == str(end['skipped'])
