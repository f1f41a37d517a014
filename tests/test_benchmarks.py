"""The benchmarks run (CPU smoke) and count what they claim."""
import argparse
import json
import math

import pytest
import torch

from conftest import ENV, run_script


def test_benchmark_smoke_writes_every_recipe(tmp_path):
    out = tmp_path / 'bench.json'
    proc = run_script('benchmark.py', '--smoke', '--json', out, cwd=tmp_path, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    recipes = [r['recipe'] for r in report['results']]
    assert recipes == ['fp32-classic', 'fp32', 'fp16-manual', 'fp16-optimizer-static',
                       'fp16-optimizer-dynamic', 'amp', 'bf16']
    assert report['torch'] == torch.__version__
    assert report['device'].startswith('cpu')
    fp32 = next(r for r in report['results'] if r['recipe'] == 'fp32')
    for r in report['results']:
        assert r['ms_per_step'] > 0 and r['tokens_per_s'] > 0 and r['eval_ms_per_batch'] > 0
        assert r['peak_memory_bytes'] > 0 and r['memory_kind'] == 'cpu max rss'
        assert math.isclose(r['ratio_to_fp32'], r['tokens_per_s'] / fp32['tokens_per_s'])
        assert math.isfinite(r['last_loss'])
    # progress lines and the table
    assert proc.stdout.count('warm-up') == len(recipes)
    assert 'x fp32' in proc.stdout


def test_step_flops_counts_lstm_and_decoder():
    import benchmark
    cfg = argparse.Namespace(model='LSTM', emsize=3, nhid=5, nlayers=2, bptt=7, batch_size=2, ntokens=11)
    tokens = 14
    expected = 2 * tokens * (3 + 5) * 4 * 5 + 2 * tokens * (5 + 5) * 4 * 5 + 2 * tokens * 5 * 11
    assert benchmark.step_flops(cfg) == expected
    assert benchmark.peak_tflops('NVIDIA H100 80GB HBM3', 'fp16') == 989
    assert benchmark.peak_tflops('NVIDIA H100 PCIe', 'tf32') == 378
    assert benchmark.peak_tflops('cpu', 'fp32') is None
