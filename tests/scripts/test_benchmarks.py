"""The benchmarks run as modules from the repository root (CPU smoke), and count what they claim."""
import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import training
from benchmarks import chunked_cross_entropy as chunked_bench
from benchmarks import corpus as corpus_bench
from benchmarks import fp16_cpu_profile as fp16_profile_bench
from benchmarks import fp16_optimizer as fp16_optimizer_bench
from benchmarks import recipes as recipes_bench
from conftest import ENV, REPO
from model import RNNModel
from plumbing import cli


def run_module(module, *args, timeout=240):
    """`python -m module args` from the repository root, as the README runs it."""
    env = dict(os.environ, PYTHONUNBUFFERED='1', CUDA_VISIBLE_DEVICES='', **ENV)
    return subprocess.run([sys.executable, '-m', module, *map(str, args)], cwd=str(REPO),
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_recipes_smoke_writes_every_recipe(tmp_path):
    out = tmp_path / 'bench.json'
    proc = run_module('benchmarks.recipes', '--smoke', '--json', out, timeout=300)
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
    by_name = {r['recipe']: r for r in report['results']}
    # The dynamic scale starts at apex's 2^16 and halves on each skipped step (it grows only after 2000 clean ones).
    dynamic = by_name['fp16-optimizer-dynamic']
    assert dynamic['final_loss_scale'] == 2.0 ** (16 - dynamic['skipped_steps'])
    assert by_name['fp16-manual']['skipped_steps'] == 0 and by_name['fp16-manual']['final_loss_scale'] == 128
    assert by_name['bf16']['final_loss_scale'] is None
    # progress lines and the table
    assert proc.stdout.count('warm-up') == len(recipes)
    assert 'x fp32' in proc.stdout


def test_every_recipe_name_is_its_recipes_name():
    cfg = argparse.Namespace(lr=1.0, clip=0.25, static_loss_scale=128.0)
    for name, make in recipes_bench.RECIPES.items():
        if name in ('fp32-classic', 'fp32-tf32'):
            continue
        recipe = make(RNNModel('LSTM', 8, 4, 4, 2), cfg)
        assert recipe.name == name
        assert recipe.optimizer.param_groups[0]['lr'] == 1.0


@pytest.mark.parametrize('argv, message', [
    (['--recipes', 'fp32,nope'], 'unknown recipe(s) nope'),
    (['--steps', '0'], '--steps must be at least 1 (got 0).'),
    (['--model', 'TRANSFORMER'], '--model TRANSFORMER is not a known model type'),
    (['--model', 'Transformer', '--emsize', '16', '--nhead', '3'], '--emsize 16 must be a multiple of --nhead 3'),
    (['--data', '/no/such/dir'], '--data /no/such/dir: no such directory.'),
])
def test_recipes_rejects_bad_flags_in_one_sentence(argv, message, capsys):
    assert cli.guarded_main(recipes_bench.main, argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count('\n') == 1


def test_step_flops_counts_lstm_and_decoder():
    cfg = argparse.Namespace(model='LSTM', emsize=3, nhid=5, nlayers=2, bptt=7, batch_size=2, ntokens=11)
    tokens = 14
    expected = 2 * tokens * (3 + 5) * 4 * 5 + 2 * tokens * (5 + 5) * 4 * 5 + 2 * tokens * 5 * 11
    assert recipes_bench.step_flops(cfg) == expected
    assert recipes_bench.peak_tflops('NVIDIA H100 80GB HBM3', 'fp16') == 989
    assert recipes_bench.peak_tflops('NVIDIA H100 PCIe', 'tf32') == 378
    assert recipes_bench.peak_tflops('cpu', 'fp32') is None


def test_step_flops_counts_transformer_layers_and_decoder():
    cfg = argparse.Namespace(model='Transformer', emsize=4, nhid=6, nlayers=2, bptt=7, batch_size=2, ntokens=11)
    tokens = 14
    per_layer = 2 * tokens * (4 * 4 * 4 + 2 * 7 * 4 + 2 * 4 * 6)  # q, k, v, out; scores, weighted sum; feed-forward
    assert recipes_bench.step_flops(cfg) == 2 * per_layer + 2 * tokens * 4 * 11


@pytest.mark.parametrize('name', ['fp32-classic', 'fp16-manual', 'bf16'])
def test_recipes_measures_the_transformer(name):
    """A few recipes, each path once (classic step, fp16 model, autocast): test_transformer.py trains with all."""
    cfg = recipes_bench.parse_args(['--smoke', '--model', 'Transformer', '--nhead', '4'])
    rng = torch.get_rng_state()
    result = recipes_bench.measure(name, cfg, torch.device('cpu'), recipes_bench.token_stream(cfg))
    torch.set_rng_state(rng)
    assert result['ms_per_step'] > 0 and math.isfinite(result['last_loss'])


def test_corpus_smoke_alternates_cold_loads(corpus_dir):
    proc = run_module('benchmarks.corpus', '--data', corpus_dir, '--repeats', 1, '--keep-page-cache')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split('|')[2].strip() for line in lines[:2]] == ['corpus', 'per-element']
    assert 'page cache dropped: False' in lines[0]
    assert lines[-1].startswith('| best of 1: Corpus ') and 'speed-up' in lines[-1]


def test_corpus_scale_and_missing_data(corpus_dir, capsys):
    assert cli.guarded_main(corpus_bench.main, ['--data', str(corpus_dir), '--scale', '2', '--keep-page-cache']) == 0
    assert '| Corpus on train.txt x2:' in capsys.readouterr().out
    assert cli.guarded_main(corpus_bench.main, ['--data', '/no/such/dir']) == 2
    assert '--data /no/such/dir: no such directory.' in capsys.readouterr().err


def test_fp16_optimizer_smoke():
    proc = run_module('benchmarks.fp16_optimizer', '--emsize', 16, '--nhid', 16, '--ntokens', 64, '--steps', 2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count('| FP16_Optimizer ') == 2
    assert '| best: FP16_Optimizer ' in proc.stdout


def test_chunked_cross_entropy_benchmark_smoke(capsys):
    argv = ['--emsize', '8', '--nhid', '8', '--ntokens', '64', '--batch_size', '4', '--bptt', '5',
            '--rounds', '2', '--steps', '1', '--warmup', '1']
    assert cli.guarded_main(chunked_bench.main, argv) == 0
    out = capsys.readouterr().out
    assert out.count('| round ') == 2
    for variant in chunked_bench.VARIANTS:
        assert f'\n{variant} ' in out
    assert training.cross_entropy is chunked_bench.VARIANTS['fp32'][1]  # put back after each variant


def test_chunked_cross_entropy_benchmark_swaps_the_loss_train_batch_uses():
    calls = []
    cfg = argparse.Namespace(seed=1, ntokens=16, emsize=4, nhid=4, dropout=0.0, lr=1.0, clip=0.25,
                             batch_size=2, bptt=3)
    train_data = torch.arange(40).remainder(16).view(-1, 2)
    variant = chunked_bench.Variant('bf16 plain', cfg, train_data)
    def spy(logits, targets):
        calls.append(logits.dtype)
        return chunked_bench.plain_cross_entropy(logits, targets)
    variant.loss = spy
    variant.steps(2)
    assert calls == [torch.bfloat16, torch.bfloat16]
    assert training.cross_entropy is not variant.loss


@pytest.mark.parametrize('module', [recipes_bench, corpus_bench, fp16_optimizer_bench, chunked_bench, fp16_profile_bench])
def test_help_names_the_module_command(module, capsys):
    with pytest.raises(SystemExit) as exit_:
        module.main(['--help'])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f'usage: python3 -m {module.__name__} ')


def test_fp16_cpu_profile_smoke(capsys):
    """One profiled step of each recipe: both tables, with the matrix products in them, and the ratio."""
    threads = torch.get_num_threads()
    try:
        code = cli.guarded_main(fp16_profile_bench.main, ['--nhid', '8', '--ntokens', '40', '--batch_size', '2', '--bptt', '3',
                                                  '--rows', '100'],  # every operator: tiny steps rank them by noise
                       prog=fp16_profile_bench.PROG)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert code == 0, out
    fp32, fp16 = out.split('== fp32: ')[1].split('== fp16 manual: ')
    assert 'aten::addmm' in fp32 and 'aten::addmm' in fp16, out
    assert '| fp16 manual / fp32: ' in fp16


def test_fp16_cpu_profile_rejects_bad_sizes(capsys):
    assert cli.guarded_main(fp16_profile_bench.main, ['--nhid', '0'], prog=fp16_profile_bench.PROG) == 2
    assert capsys.readouterr().err == f'{fp16_profile_bench.PROG}: error: --nhid must be at least 1 (got 0).\n'
