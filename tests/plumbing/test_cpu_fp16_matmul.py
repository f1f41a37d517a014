"""plumbing/cpu_fp16_matmul.py: fp16 and bf16 products as fp32 products rounded once, on CPUs without that arithmetic."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from plumbing import cpu_fp16_matmul

# Runs in its own Python: the kernels it registers stay for the life of a process, and the
# products before it must come from PyTorch's own kernels. argv[1]: the low precision, float16 or bfloat16.
COMPARE = r'''
import json, sys, torch; from plumbing import cpu_fp16_matmul
low = getattr(torch, sys.argv[1])
torch.manual_seed(0)
a, b, bias = torch.randn(300, 96), torch.randn(96, 500), torch.randn(500)
def products(dtype):
    x, y, c = a.to(dtype), b.to(dtype), bias.to(dtype)
    return [torch.mm(x, y), torch.addmm(c, x, y), torch.addmm(c, x, y, beta=0.5, alpha=2.0), torch.mm(y.t(), x.t())]
x, y, c = (t.to(low).double() for t in (a, b, bias))
exact = [x @ y, c + x @ y, 0.5 * c + 2.0 * (x @ y), (x @ y).t()]  # the low-precision inputs' products in fp64
def lstm_grads():
    torch.manual_seed(1)
    lstm = torch.nn.LSTM(32, 32, 2).to(low)
    out, _ = lstm(torch.randn(7, 8, 32).to(low))
    out.float().square().sum().backward()
    return [out.detach()] + [p.grad for p in lstm.parameters()]
def mismatch_error():
    try:
        torch.mm(a.to(low), b)
    except RuntimeError as e:
        return str(e)
dtypes = [torch.float16, torch.float32, torch.float64, torch.bfloat16]
before = {str(d): products(d) for d in dtypes}
before_lstm, before_error = lstm_grads(), mismatch_error()
cpu_fp16_matmul.use_fp32_products(low)
cpu_fp16_matmul.use_fp32_products(low)  # a second call changes nothing
after = {str(d): products(d) for d in dtypes}
error = lambda products: [(p.double() - e).abs().max().item() for p, e in zip(products, exact)]
report = {
    'dtypes': {d: [new.dtype == old.dtype and bool(torch.equal(new, old)) for old, new in zip(before[d], after[d])]
               for d in before if d != str(low)},
    'low_errors': [error(before[str(low)]), error(after[str(low)])],
    'low_share_changed': [(new != old).float().mean().item() for old, new in zip(before[str(low)], after[str(low)])],
    'low_dtypes': [str(t.dtype) for t in after[str(low)]],
    'lstm_max_rel': max(((n.float() - o.float()).abs().max() / o.float().abs().max()).item()
                        for o, n in zip(before_lstm, lstm_grads())),
    'errors': [before_error, mismatch_error()],
}
print(json.dumps(report))
'''
LOW = {'float16': 2e-3, 'bfloat16': 2e-2}  # the low precisions, and how far an LSTM's numbers may move


@pytest.fixture(scope='module', params=list(LOW))
def report(request):
    proc = subprocess.run([sys.executable, '-c', COMPARE, request.param], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert 'Overriding a previously registered kernel' not in proc.stderr  # the registration is quiet
    return request.param, json.loads(proc.stdout.splitlines()[-1])


def test_other_dtypes_run_the_usual_kernels_bit_for_bit(report):
    low, report = report
    assert len(report['dtypes']) == 3
    for dtype, same in report['dtypes'].items():
        assert same == [True] * 4, dtype


def test_low_precision_products_are_as_exact_as_the_generic_kernels(report):
    """Both sum in fp32 and round once, so they differ only where the order of the sum does (rarely), and lie
    as close to the exact product; adding addmm's bias after rounding, or summing in low precision, would not."""
    low, report = report
    assert report['low_dtypes'] == [f'torch.{low}'] * 4
    generic, fp32_products = report['low_errors']
    assert all(new <= old * 1.01 for old, new in zip(generic, fp32_products)), report['low_errors']
    assert all(share < 0.01 for share in report['low_share_changed']), report['low_share_changed']


def test_a_low_precision_lstm_trains_on_the_same_numbers(report):
    """Forward and backward of an fp16 or bf16 LSTM (its products go through aten::mm and aten::addmm)."""
    low, report = report
    assert report['lstm_max_rel'] < LOW[low]


def test_mixed_dtypes_keep_pytorchs_error(report):
    low, report = report
    before, after = report['errors']
    assert before and after == before


CPUINFO = {  # the flag lines of /proc/cpuinfo that matter, and whether the CPU computes in fp16 and in bf16
    'amd-zen3': ('flags\t\t: fpu sse2 avx2 f16c fma\n', False, False),
    'amd-zen4': ('flags\t\t: fpu sse2 avx2 f16c avx512f avx512_bf16 avx512_vnni\n', False, True),
    'intel-sapphire-rapids': ('flags\t\t: fpu avx2 f16c avx512f avx512_bf16 avx512_fp16 amx_bf16\n', True, True),
    'arm-neoverse': ('Features\t: fp asimd evtstrm fphp asimdhp cpuid bf16\n', True, True),
    'arm-without-fp16': ('Features\t: fp asimd evtstrm cpuid\n', False, False),
}


@pytest.mark.parametrize('cpu', list(CPUINFO))
def test_native_fp16_and_bf16_are_read_from_the_cpu_flags(cpu):
    text, fp16, bf16 = CPUINFO[cpu]
    cpuinfo = 'processor\t: 0\nmodel name\t: X\n' + text
    assert cpu_fp16_matmul.cpu_has_native(torch.float16, cpuinfo) is fp16
    assert cpu_fp16_matmul.cpu_has_native(torch.bfloat16, cpuinfo) is bf16


@pytest.mark.parametrize('fp16, bf16, flag, used, advice', [
    (False, True, '--fp16', True, 'is still slower than fp32 here; --bf16 is the fast low precision on this CPU'),
    (False, True, '--amp', True, 'is still slower than fp32 here; --bf16 is the fast low precision on this CPU'),
    (False, False, '--fp16', True, 'is no faster than fp32 here'),
    (False, False, '--bf16', True, 'is no faster than fp32 here'),
    (False, True, '--bf16', False, None), (True, True, '--fp16', False, None), (None, None, '--fp16', False, None),
    (False, False, '', False, None)])
def test_low_precision_on_a_cpu_without_it_uses_fp32_products_and_says_so_once(
        fp16, bf16, flag, used, advice, monkeypatch, call_script, corpus_dir, tmp_path):
    calls = []
    native = {torch.float16: fp16, torch.bfloat16: bf16}
    monkeypatch.setattr(cpu_fp16_matmul, 'cpu_has_native', lambda dtype: native[dtype])
    monkeypatch.setattr(cpu_fp16_matmul, 'use_fp32_products', calls.append)
    proc = call_script('main.py', '--data', corpus_dir, '--emsize', 16, '--nhid', 16, '--batch_size', 8,
                       '--dry-run', '--epochs', 1, *([flag] if flag else []), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stdout.splitlines() if line.startswith('Warning: this CPU has no')]
    if not used:
        assert warnings == [] and calls == [], proc.stdout
        return
    name = 'bf16' if flag == '--bf16' else 'fp16'
    assert warnings == [f'Warning: this CPU has no {name} arithmetic: {flag} runs its {name} matrix products as fp32 '
                        f'products rounded to {name} (plumbing/cpu_fp16_matmul.py) and {advice}.'], proc.stdout
    assert calls == [torch.bfloat16 if flag == '--bf16' else torch.float16]
