"""plumbing/onnx_export.py: --onnx-export checked at start-up, then the best model as an fp32 ONNX graph."""
import importlib.util
from types import SimpleNamespace

import pytest
import torch

import data
from conftest import describe, error_line, temp_files
from plumbing import checkpoint, onnx_export, session

ARGS = ['--emsize', 16, '--nhid', 16, '--batch_size', 8, '--bptt', 10, '--lr', 5, '--dropout', 0, '--epochs', 1,
        '--save', 'model.pt']


def refuse_data_loading(monkeypatch):
    """The checks under test come before the data is read: reading it fails the test."""
    def corpus(*args, **kwargs):
        raise AssertionError('the data was loaded before --onnx-export was checked')
    monkeypatch.setattr(data, 'Corpus', corpus)


def test_without_the_packages_the_flag_fails_at_start_up(tmp_path, call_script, corpus_dir, monkeypatch):
    monkeypatch.setattr(onnx_export, 'missing_packages', lambda: ['onnxscript'])
    refuse_data_loading(monkeypatch)
    proc = call_script('main.py', '--data', corpus_dir, *ARGS, '--onnx-export', 'model.onnx', cwd=tmp_path)
    line = error_line(proc, 'main.py', 2)
    assert line == ('main.py: error: --onnx-export needs onnxscript, which is not installed: '
                    'pip install -r requirements-onnx.txt installs them.')
    assert not list(tmp_path.iterdir())


def test_missing_packages_names_what_is_not_installed(monkeypatch):
    installed = {'onnx'}
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name: object() if name in installed else None)
    assert onnx_export.missing_packages() == ['onnxscript']


@pytest.mark.parametrize('path, needle', [
    ('.', 'is a directory'),
    ('model.pt', 'is the same file as --save model.pt'),
    ('model.pt.resume', 'is the same file as SAVE.resume model.pt.resume'),
    ('no-such-dir/model.onnx', 'does not exist'),
    ('{data}/train.txt', 'is the same file as --data'),
])
def test_an_unusable_path_fails_at_start_up(path, needle, tmp_path, call_script, corpus_dir, monkeypatch):
    monkeypatch.setattr(onnx_export, 'missing_packages', lambda: [])  # the path is checked whether or not they are
    refuse_data_loading(monkeypatch)
    proc = call_script('main.py', '--data', corpus_dir, *ARGS, '--onnx-export', path.format(data=corpus_dir),
                       cwd=tmp_path)
    line = error_line(proc, 'main.py', 2)
    assert '--onnx-export' in line and needle in line, line


def test_no_finished_epoch_means_nothing_to_export(tmp_path, capsys):
    args = SimpleNamespace(save=str(tmp_path / 'model.pt'), onnx_export=str(tmp_path / 'model.onnx'), bptt=10)
    session.export_best_model(args, session.Progress())
    out = capsys.readouterr().out
    assert out == f'| no epoch finished, so there is no best model to export to {args.onnx_export}\n'
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- the export itself (requirements-onnx.txt)

def onnx_logits(path, inputs):
    """The graph's first output for inputs (in the graph's input order): onnxruntime's if installed, else
    the onnx package's reference evaluator's."""
    import onnx
    onnx.checker.check_model(str(path), full_check=True)
    if importlib.util.find_spec('onnxruntime') is not None:
        import onnxruntime
        session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
        names = [i.name for i in session.get_inputs()]
        return session.run(None, dict(zip(names, inputs)))[0]
    from onnx.reference import ReferenceEvaluator
    evaluator = ReferenceEvaluator(str(path))
    return evaluator.run(None, dict(zip(evaluator.input_names, inputs)))[0]


@pytest.mark.parametrize('script, flags', [('main.py', ['--fp16']), ('main_fp16_optimizer.py', ['--model', 'GRU'])])
def test_the_exported_graph_computes_the_best_models_logits(script, flags, tmp_path, call_script, corpus_dir):
    pytest.importorskip('onnx')
    pytest.importorskip('onnxscript')
    import onnx
    proc = call_script(script, '--data', corpus_dir, *ARGS, *flags, '--onnx-export', 'model.onnx', cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout.endswith('| the best model is exported to ONNX in model.onnx\n')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model.onnx', 'model.pt', 'model.pt.metrics.jsonl', 'model.pt.resume']
    assert not temp_files(tmp_path)

    graph = onnx.load(str(tmp_path / 'model.onnx')).graph
    assert graph.output[0].name == 'logits'
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32, after fp16 training too

    model, _, _ = checkpoint.load_model(str(tmp_path / 'model.pt'))
    model.eval()
    torch.manual_seed(0)
    inputs = torch.randint(model.encoder.num_embeddings, (10, 1))  # the exported shape: [bptt, 1]
    hidden = model.init_hidden(1)
    hidden = tuple(torch.randn_like(h) for h in hidden) if isinstance(hidden, tuple) else torch.randn_like(hidden)
    with torch.no_grad():
        expected, _ = model(inputs, hidden)
    feeds = [inputs, *(hidden if isinstance(hidden, tuple) else (hidden,))]
    got = onnx_logits(tmp_path / 'model.onnx', [t.numpy() for t in feeds])
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-5)
