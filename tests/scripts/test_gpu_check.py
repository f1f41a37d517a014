"""The GPU check (benchmarks/gpu_check.sh) and the claim runs (benchmarks/claim_runs.sh) proven on the CPU
in their tiny modes, before any GPU time is spent on them; and the checks they make (benchmarks/gpu_check.py,
benchmarks/kernels.py) shown to fail where they should."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks import gpu_check, kernels
from conftest import REPO

ENV = dict(os.environ, PYTHONUNBUFFERED='1', CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1')
ENV['PATH'] = os.path.dirname(sys.executable) + os.pathsep + ENV.get('PATH', '')  # python3 is this Python


def bash(*args, env=None, timeout=600):
    return subprocess.run(['bash', *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=dict(ENV, **(env or {})))


@pytest.mark.slow
def test_gpu_check_in_tiny_mode_reports_every_path_ok(corpus_dir, tmp_path):
    out = tmp_path / 'out'
    proc = bash('benchmarks/gpu_check.sh', corpus_dir, out, env={'GPU_CHECK_TINY': '1'})
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    assert 'Traceback' not in report
    lines = (out / 'summary.txt').read_text().splitlines()
    verdicts = {line[6:40].strip(): line[:5].strip() for line in lines if line[:5].strip() in ('ok', 'FAIL', 'skip')}
    assert 'FAIL' not in verdicts.values(), report
    # Only what cannot run on a CPU is skipped.
    assert [p for p, v in verdicts.items() if v == 'skip'] == ['CPU fp16 matmul fix off on CUDA']
    for path in ('benchmark', 'matrix-product precision', 'SIGTERM then --resume', 'torchrun --nproc_per_node 1',
                 '--onnx-export', 'metrics files', 'generate.py (lstm-fp16)', 'generate.py (transformer-bf16)',
                 *(f'{m}-{r}' for m in ('lstm', 'transformer')
                   for r in ('fp32', 'fp16', 'amp', 'bf16', 'opt-static', 'opt-dynamic'))):
        assert verdicts.get(path) == 'ok', (path, report)
    assert len(list(out.iterdir())) <= 8
    assert all(f.stat().st_size < 16 * 2 ** 20 for f in out.iterdir())
    assert lines[-1].startswith('all paths ok')


def metrics_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_claim_runs_stopped_and_continued_end_as_one_uninterrupted_run(corpus_dir, tmp_path):
    tiny = {'CLAIM_TINY': '1', 'CLAIM_EPOCHS': '40'}
    # The same run twice at once: once stopped by SIGTERM after 12 s and continued, once never stopped.
    stopped = subprocess.Popen(['bash', 'benchmarks/claim_runs.sh', 'start', str(corpus_dir), str(tmp_path / 'a'), 'fp16-128'],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=dict(ENV, **tiny, CLAIM_SECONDS='12', CLAIM_STATE=str(tmp_path / 'sa')))
    whole = bash('benchmarks/claim_runs.sh', 'start', corpus_dir, tmp_path / 'b', 'fp16-128',
                 env=dict(tiny, CLAIM_STATE=str(tmp_path / 'sb')))
    first = stopped.communicate(timeout=300)[0]
    assert whole.returncode == 0 and 'fp16-128: ended' in whole.stdout, whole.stdout + whole.stderr
    assert stopped.returncode == 0 and 'fp16-128: stopped; run continue again' in first, first
    log = (tmp_path / 'a' / 'fp16-128.log').read_text()
    assert '== exit code 143' in log and 'SIGTERM' in log
    # A new, empty OUT, as the GPU machine gives each command: the state is in CLAIM_STATE.
    again = bash('benchmarks/claim_runs.sh', 'continue', corpus_dir, tmp_path / 'a2',
                 env=dict(tiny, CLAIM_STATE=str(tmp_path / 'sa')))
    assert again.returncode == 0 and 'fp16-128: ended' in again.stdout, again.stdout + again.stderr
    log = (tmp_path / 'a2' / 'fp16-128.log').read_text()
    assert 'Traceback' not in log and log.count('== exit code') == 2
    # Stopped in training, the run continues from its SAVE.resume; stopped before (on a loaded machine
    # even during the imports), it saved nothing and starts again. Either way it ends as the uninterrupted run.
    assert ('| resuming ' in log) == ('| SIGTERM: stopping after this batch' in log)
    a, b = (metrics_lines(tmp_path / d / 'fp16-128.metrics.jsonl') for d in ('a2', 'b'))
    assert a[-1]['kind'] == b[-1]['kind'] == 'end'
    assert a[-1]['test_ppl'] == b[-1]['test_ppl']
    good, line = gpu_check.same(tmp_path / 'a2' / 'fp16-128.metrics.jsonl', tmp_path / 'b' / 'fp16-128.metrics.jsonl', 0)
    assert good, line
    # Only logs and metrics files come back: no checkpoint in OUT.
    assert sorted(f.name for f in (tmp_path / 'a2').iterdir()) == ['fp16-128.log', 'fp16-128.metrics.jsonl']
    rows = gpu_check.table([tmp_path / 'a2' / 'fp16-128.metrics.jsonl'])
    assert rows[0].startswith('| `main.py --fp16` | 128 | 40 | ') and rows[0].endswith(' | ~90 |')


@pytest.mark.slow
def test_claim_runs_probe_compares_one_run_alone_with_two_side_by_side(corpus_dir, tmp_path):
    proc = bash('benchmarks/claim_runs.sh', 'probe', corpus_dir, tmp_path / 'out',
                env={'CLAIM_TINY': '1', 'PROBE_SECONDS': '15', 'CLAIM_STATE': str(tmp_path / 'state')})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (tmp_path / 'out' / 'probe.txt').read_text()
    assert text.startswith('probe: fp16-128 alone ') and 'side by side fp16-128 ' in text and 'nan' not in text
    assert sorted(f.name for f in (tmp_path / 'out').iterdir()) == ['probe.txt']


def test_claim_runs_unknown_run_is_one_sentence(corpus_dir, tmp_path):
    proc = bash('benchmarks/claim_runs.sh', 'start', corpus_dir, tmp_path, 'fp64')
    assert proc.returncode == 2
    assert 'unknown run fp64' in proc.stderr and 'Traceback' not in proc.stderr


def write_metrics(path, records):
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))
    return path


RECORDS = [{'kind': 'run', 'torch': 'x', 'elapsed': 0.0},
           {'kind': 'train', 'loss': 6.5, 'ms_per_batch': 5.1, 'loss_scale': 128.0, 'skipped': 0, 'elapsed': 1.0},
           {'kind': 'epoch', 'valid_loss': 6.0, 'valid_ppl': 403.4, 'epoch_seconds': 9.0, 'elapsed': 2.0},
           {'kind': 'end', 'test_loss': 5.9, 'test_ppl': 365.0, 'stopped': False, 'elapsed': 3.0}]


def test_same_ignores_timings_and_finds_a_changed_loss(tmp_path):
    a = write_metrics(tmp_path / 'a.jsonl', RECORDS)
    b = write_metrics(tmp_path / 'b.jsonl', [dict(r, elapsed=9.9, ms_per_batch=1.0) for r in RECORDS])
    assert gpu_check.same(a, b, 0)[0]
    changed = [dict(r) for r in RECORDS]
    changed[1]['loss'] = 6.5 * (1 + 1e-6)
    c = write_metrics(tmp_path / 'c.jsonl', changed)
    good, line = gpu_check.same(a, c, 0)
    assert not good and line.startswith('record 1 (train): loss')
    assert gpu_check.same(a, c, 1e-5)[0]
    assert not gpu_check.same(a, write_metrics(tmp_path / 'd.jsonl', RECORDS[:-1]), 0)[0]


def test_metrics_check_wants_every_kind_of_record(tmp_path):
    assert gpu_check.check_metrics(write_metrics(tmp_path / 'a.jsonl', RECORDS))[0]
    good, line = gpu_check.check_metrics(write_metrics(tmp_path / 'b.jsonl', RECORDS[:2]))
    assert not good and 'no epoch, end record' in line


@pytest.mark.parametrize('name, dtype', [
    ('nvjet_sm90_hsh_64x24_64x16_4x1_v_bz_splitK_NNT', 'fp16'),
    ('nvjet_sm90_bsb_128x64_64x4_1x2_h_bz_TNT', 'bf16'),
    ('nvjet_sm90_tst_128x128_32x4_1x2_h_bz_NNN', 'tf32'),
    ('nvjet_sm90_sss_64x32_32x4_1x2_v_bz_NNT', 'fp32'),
    ('ampere_sgemm_128x64_tn', 'fp32'),
    ('sm80_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize96x128x32', 'bf16'),
    ('sm80_xmma_gemm_f16f16_f16f32_f32_nn_n_tilesize64x64x64', 'fp16'),
    ('cutlass_80_tensorop_s1688gemm_128x128_16x4_tn_align4', 'tf32'),
    ('void cudnn::rnn::RNN_blockPersist_fp_LSTM<__half, __half, float>(...)', 'fp16'),
    ('void elemWiseRNNcell<__nv_bfloat16, float>(...)', 'bf16'),
    ('void at::native::vectorized_elementwise_kernel<4>(...)', 'unknown'),
])
def test_kernel_names_give_their_precision(name, dtype):
    assert kernels.kernel_dtype(name) == dtype


def benchmark_report(tmp_path, rnn_dtype):
    """A CUDA benchmark report whose bf16 recipe ran its RNN in rnn_dtype."""
    def result(recipe, rnn, decoder):
        return {'recipe': recipe, 'matmul_dtypes': {'rnn': {'dtypes': [rnn], 'top': [['k', 1.0, rnn]]},
                                                    'decoder': {'dtypes': [decoder], 'top': [['k', 1.0, decoder]]}}}
    report = {'device': 'NVIDIA H100 80GB HBM3', 'config': {'model': 'LSTM'},
              'results': [result('fp32', 'fp32', 'fp32'), result('amp', 'fp16', 'fp16'),
                          result('bf16', rnn_dtype, 'bf16')]}
    path = tmp_path / 'benchmark.json'
    path.write_text(json.dumps(report))
    return path


@pytest.mark.parametrize('rnn_dtype, good', [('bf16', True), ('fp32', True), ('fp16', False)])
def test_kernel_check_fails_a_bf16_rnn_in_fp16(rnn_dtype, good, tmp_path, capsys):
    ok, line = gpu_check.check_kernels(benchmark_report(tmp_path, rnn_dtype))
    assert ok is good
    if not good:
        assert line == 'bf16: the rnn ran in fp16, expected bf16/fp32/tf32'


def test_claim_runs_say_which_run_failed(tmp_path):
    (tmp_path / 'empty').mkdir()
    proc = bash('benchmarks/claim_runs.sh', 'start', tmp_path / 'empty', tmp_path / 'out', 'fp32',
                env={'CLAIM_TINY': '1', 'CLAIM_STATE': str(tmp_path / 'state')})
    assert proc.returncode == 1 and proc.stdout == 'fp32: failed with exit code 1 (see fp32.log)\n', proc.stdout
    assert 'train.txt is missing' in (tmp_path / 'out' / 'fp32.log').read_text()
    missing = bash('benchmarks/claim_runs.sh', 'continue', tmp_path / 'nowhere', tmp_path / 'out')
    assert missing.returncode == 2 and missing.stderr.endswith('nowhere: no such directory\n')
