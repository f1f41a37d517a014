"""A newcomer's second hour: any device, prompt feedback, what a stopped run leaves, resume with one flag."""
import json
import os
import re
import signal
import subprocess
import sys
import threading

import pytest

from conftest import ENV, REPO, describe, error_line
from plumbing import session

TINY = ['--emsize', 16, '--nhid', 16, '--batch_size', 8, '--bptt', 10, '--lr', 5, '--dropout', 0.1]


def run_record(tmp_path, save='model.pt'):
    with open(tmp_path / f'{save}.metrics.jsonl') as f:
        return json.loads(f.readline())


# ---------------------------------------------------------------- any device

def test_accel_without_an_accelerator_runs_on_the_cpu_and_says_so(tmp_path, call_script, corpus_dir):
    proc = call_script('main.py', '--data', corpus_dir, *TINY, '--epochs', 1, '--dry-run', '--accel', cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout.startswith('| --accel: torch.accelerator finds no accelerator (CUDA, MPS, XPU, ...), so this '
                                  'runs on the CPU\n'), proc.stdout
    assert '| device cpu |' in proc.stdout


def test_cuda_without_cuda_is_still_an_error(tmp_path, call_script, corpus_dir):
    proc = call_script('main.py', '--data', corpus_dir, *TINY, '--dry-run', '--cuda', cwd=tmp_path)
    assert 'no CUDA device is available' in error_line(proc, 'main.py', 2)


@pytest.mark.parametrize('flags, expected', [
    (['--size', 'auto', '--accel'], {'emsize': 128, 'nhid': 128, 'dropout': 0.2, 'batch_size': 32, 'epochs': 6}),
    (['--size', 'cpu', '--emsize', 32, '--epochs', 1], {'emsize': 32, 'nhid': 128, 'dropout': 0.2, 'epochs': 1}),
    (['--size', 'apex', '--emsize', 16, '--nhid', 16], {'emsize': 16, 'nhid': 16, 'dropout': 0.65, 'epochs': 40}),
])
def test_size_sets_the_flags_not_given(flags, expected, tmp_path, call_script, corpus_dir):
    """--size auto without an accelerator is the CPU size; a flag given keeps its value."""
    proc = call_script('main.py', '--data', corpus_dir, *flags, '--dry-run', '--epochs', 1, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    saved = run_record(tmp_path)['flags']
    assert {k: saved[k] for k in expected if k != 'epochs'} == {k: v for k, v in expected.items() if k != 'epochs'}


# ---------------------------------------------------------------- feedback within seconds

def test_a_run_says_it_trains_before_its_first_progress_line(tmp_path, call_script, corpus_dir, monkeypatch):
    monkeypatch.setattr(session, 'FIRST_NEWS_S', 0)
    proc = call_script('main.py', '--data', corpus_dir, *TINY, '--epochs', 2, '--log-interval', 20, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    lines = proc.stdout.splitlines()
    news = [i for i, line in enumerate(lines) if line.startswith('| training: ')]
    assert len(news) == 1, proc.stdout
    assert re.fullmatch(r'\| training: 2 batches in [\d.]+s, so about \d+s an epoch of 38 batches; '
                        r'a progress line every 20 batches', lines[news[0]]), lines[news[0]]
    first_progress = next(i for i, line in enumerate(lines) if line.startswith('| epoch '))
    assert news[0] < first_progress
    # apex's progress line keeps its format
    assert re.fullmatch(r'\| epoch +1 \| +20/ +38 batches \| lr 5 \| ms/batch +[\d.]+ \| loss +[\d.]+ \| ppl +[\d.]+ '
                        r'\| tok/s +\d+ \| eta +\d+s \| skipped 0', lines[first_progress]), lines[first_progress]


def test_no_news_line_when_progress_lines_come_first(tmp_path, call_script, corpus_dir):
    proc = call_script('main.py', '--data', corpus_dir, *TINY, '--epochs', 1, '--log-interval', 1, cwd=tmp_path)
    assert proc.returncode == 0 and '| training: ' not in proc.stdout, describe(proc)


def test_a_long_loop_reports_how_far_it_is(capsys):
    steps = list(session.reported(range(5), 'evaluating', first_after=0, every=0))
    assert steps == list(range(5))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(',')[0] for line in lines] == [f'| evaluating: {n}/5 batches' for n in (1, 2, 3, 4)]
    assert all(re.search(r', about \d+s left$', line) for line in lines), lines


def test_a_short_loop_reports_nothing(capsys):
    assert list(session.reported(range(50), 'evaluating')) == list(range(50))
    assert capsys.readouterr().out == ''


def test_after_a_stop_the_test_is_announced_with_how_to_skip_it(tmp_path, corpus_dir):
    args = [sys.executable, str(REPO / 'main.py'), '--data', str(corpus_dir), *map(str, TINY), '--epochs', 1000,
            '--log-interval', 5]
    env = dict(os.environ, PYTHONUNBUFFERED='1', CUDA_VISIBLE_DEVICES='', **ENV)
    proc = subprocess.Popen(list(map(str, args)), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    watchdog = threading.Timer(150, proc.kill)
    watchdog.start()
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith('| epoch   2 |'):
                proc.send_signal(signal.SIGINT)
                break
        rest, err = proc.communicate(timeout=120)
    finally:
        watchdog.cancel()
    out = ''.join(seen) + rest
    assert proc.returncode == 0, out + err
    lines = out.splitlines()
    announce = lines.index('| testing the best model on the test set; Ctrl-C again skips the test and exits at once')
    assert lines[announce - 1].startswith('Exiting from training early at epoch 2')
    assert any(line.startswith('| End of training') for line in lines[announce:])


# ---------------------------------------------------------------- what a stopped run leaves

@pytest.fixture(scope='module')
def stopped_before_an_epoch(tmp_path_factory, corpus_dir):
    """The files of a run stopped in its first epoch: SAVE.resume, and no best model."""
    directory = tmp_path_factory.mktemp('stopped')
    args = [sys.executable, str(REPO / 'main.py'), '--data', str(corpus_dir), *map(str, TINY), '--epochs', 1000,
            '--log-interval', 5, '--dropout', 0.2, '--batch_size', 4]
    env = dict(os.environ, PYTHONUNBUFFERED='1', CUDA_VISIBLE_DEVICES='', **ENV)
    proc = subprocess.Popen(list(map(str, args)), cwd=directory, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    for line in proc.stdout:
        if line.startswith('| epoch   1 |'):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    assert sorted(p.name for p in directory.iterdir()) == ['model.pt.metrics.jsonl', 'model.pt.resume']
    return directory


@pytest.mark.parametrize('script', ['generate.py', 'grad_stats.py'])
def test_a_missing_checkpoint_beside_a_resume_file_says_how_to_use_it(script, stopped_before_an_epoch, corpus_dir):
    proc = run(script, '--data', corpus_dir, cwd=stopped_before_an_epoch)
    line = error_line(proc, script, 2)
    assert line == (f'{script}: error: --checkpoint ./model.pt: no such file, but ./model.pt.resume is: the run that '
                    'writes ./model.pt was stopped before an epoch ended, and ./model.pt.resume holds its latest '
                    'weights; give --checkpoint ./model.pt.resume to use them.'), line


def test_generate_samples_from_a_resume_file(stopped_before_an_epoch, call_script, tmp_path):
    proc = call_script('generate.py', '--checkpoint', stopped_before_an_epoch / 'model.pt.resume', '--words', 30,
                       '--outf', tmp_path / 'out.txt', cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert len((tmp_path / 'out.txt').read_text().split()) == 30


def run(script, *args, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED='1', CUDA_VISIBLE_DEVICES='', **ENV)
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env=env)


# ---------------------------------------------------------------- resume with one flag

def losses(out):
    return re.findall(r'\| (?:loss|valid loss|test loss) +([\d.]+)', out)


def test_resume_takes_every_flag_from_the_file(tmp_path, call_script, corpus_dir):
    """--resume alone continues the saved run: the same losses as a run never stopped."""
    flags = ['--data', corpus_dir, *TINY, '--log-interval', 10, '--seed', 7, '--bf16']
    whole = call_script('main.py', *flags, '--epochs', 2, '--save', tmp_path / 'whole.pt', cwd=tmp_path)
    first = call_script('main.py', *flags, '--epochs', 1, cwd=tmp_path)
    assert whole.returncode == 0 and first.returncode == 0, describe(first)
    resumed = call_script('main.py', '--resume', 'model.pt.resume', '--epochs', 2, cwd=tmp_path)
    assert resumed.returncode == 0, describe(resumed)
    assert '| precision bf16' in resumed.stdout
    assert losses(first.stdout)[:-1] + losses(resumed.stdout) == losses(whole.stdout)


def test_resume_refuses_a_flag_given_that_differs(tmp_path, call_script, corpus_dir):
    first = call_script('main.py', '--data', corpus_dir, *TINY, '--epochs', 1, cwd=tmp_path)
    assert first.returncode == 0, describe(first)
    proc = call_script('main.py', '--resume', 'model.pt.resume', '--epochs', 2, '--nhid', 32, cwd=tmp_path)
    line = error_line(proc, 'main.py', 2)
    assert line.startswith('main.py: error: cannot resume from model.pt.resume: --nhid was 16, now 32 (a resumed run '
                           'continues the saved one exactly: only --epochs,'), line


def test_resume_refuses_a_best_model_file_before_anything(tmp_path, call_script, corpus_dir):
    first = call_script('main.py', '--data', corpus_dir, *TINY, '--epochs', 1, cwd=tmp_path)
    assert first.returncode == 0, describe(first)
    proc = call_script('main.py', '--resume', 'model.pt', cwd=tmp_path)
    assert 'is a best-model checkpoint, not a resume checkpoint' in error_line(proc, 'main.py', 2)


# ---------------------------------------------------------------- smaller things

def test_help_shows_the_defaults(repo):
    proc = run('main.py', '-h', cwd=repo)
    assert proc.returncode == 0
    help_text = ' '.join(proc.stdout.split())
    assert '(default: 1504)' in help_text and '(default: model.pt)' in help_text and '(default: 40)' in help_text


@pytest.mark.parametrize('script, args', [('main.py', ['--lr', 'x']), ('main.py', ['--bogus']),
                                          ('generate.py', ['--words', 'many']), ('main.py', ['--fp16', '--amp'])])
def test_a_bad_flag_is_one_line(script, args, repo):
    proc = run(script, *args, cwd=repo)
    line = error_line(proc, script, 2)
    assert line.endswith(f'; see {script} -h.'), line
    assert 'usage:' not in proc.stderr


def test_no_tensor_core_warning_on_the_cpu(tmp_path, call_script, corpus_dir):
    proc = call_script('main.py', '--data', corpus_dir, *TINY, '--emsize', 17, '--nhid', 17, '--fp16', '--dry-run',
                       '--epochs', 1, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert 'Tensor Core' not in proc.stdout


def test_a_dry_run_writes_the_model_and_the_metrics_only(tmp_path, call_script, corpus_dir):
    proc = call_script('main.py', '--data', corpus_dir, *TINY, '--epochs', 2, '--dry-run', cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model.pt', 'model.pt.metrics.jsonl']


def test_prompt_with_punctuation_says_how_wikitext_writes_it(tmp_path, call_script, corpus_dir):
    proc = call_script('main.py', '--data', corpus_dir, *TINY, '--epochs', 1, '--dry-run', cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    proc = call_script('generate.py', '--prompt', 'w1,', '--words', 3, cwd=tmp_path)
    line = error_line(proc, 'generate.py', 2)
    assert '"w1,"' in line and 'punctuation as words of their own ("city ," not "city,")' in line, line


def test_onnx_graph_names_its_inputs_and_outputs(tmp_path, call_script, corpus_dir):
    pytest.importorskip('onnxscript')
    ort = pytest.importorskip('onnxruntime')
    proc = call_script('main.py', '--data', corpus_dir, *TINY, '--epochs', 1, '--dry-run', '--onnx-export',
                       tmp_path / 'model.onnx', cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    graph = ort.InferenceSession(str(tmp_path / 'model.onnx'))
    assert [i.name for i in graph.get_inputs()] == ['input', 'hidden_h', 'hidden_c']
    assert [o.name for o in graph.get_outputs()] == ['logits', 'next_hidden_h', 'next_hidden_c']


def test_metrics_table_rows_name_the_model_and_processes(tmp_path, call_script, corpus_dir, repo):
    proc = call_script('main.py', '--data', corpus_dir, *TINY, '--epochs', 1, '--dry-run', cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    table = subprocess.run([sys.executable, '-m', 'benchmarks.metrics_table', str(tmp_path / 'model.pt.metrics.jsonl')],
                           cwd=repo, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    header, _, row = table.stdout.splitlines()
    assert header.startswith('| recipe | model | processes | epochs |')
    assert row.startswith('| fp32 | LSTM 16x2 | 1 | 1 |'), row


@pytest.mark.parametrize('module', ['benchmarks.chunked_cross_entropy', 'benchmarks.fp16_cpu_profile',
                                    'benchmarks.corpus', 'benchmarks.metrics_table', 'benchmarks.recipes',
                                    'benchmarks.fp16_optimizer'])
def test_benchmark_help_is_whole_sentences(module, repo):
    proc = subprocess.run([sys.executable, '-m', module, '-h'], cwd=repo, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    description = ' '.join(proc.stdout.split('\n\n')[1].split())
    assert description.endswith(('.', ':')), description
