"""plumbing/cpu_fp16_matmul.py: fp16 products as fp32 products rounded once, on CPUs without fp16 arithmetic."""
import json
import subprocess
import sys

import pytest

from conftest import REPO
from plumbing import cpu_fp16_matmul

# Runs in its own Python: the kernels it registers stay for the life of a process, and the
# products before it must come from PyTorch's own kernels.
COMPARE = r'''
import json, torch; from plumbing import cpu_fp16_matmul
torch.manual_seed(0)
a, b, bias = torch.randn(300, 96), torch.randn(96, 500), torch.randn(500)
def products(dtype):
    x, y, c = a.to(dtype), b.to(dtype), bias.to(dtype)
    return [torch.mm(x, y), torch.addmm(c, x, y), torch.addmm(c, x, y, beta=0.5, alpha=2.0), torch.mm(y.t(), x.t())]
x, y, c = (t.half().double() for t in (a, b, bias))
exact = [x @ y, c + x @ y, 0.5 * c + 2.0 * (x @ y), (x @ y).t()]  # the fp16 inputs' products in fp64
def lstm_grads():
    torch.manual_seed(1)
    lstm = torch.nn.LSTM(32, 32, 2).half()
    out, _ = lstm(torch.randn(7, 8, 32).half())
    out.float().square().sum().backward()
    return [out.detach()] + [p.grad for p in lstm.parameters()]
def mismatch_error():
    try:
        torch.mm(a.half(), b)
    except RuntimeError as e:
        return str(e)
dtypes = [torch.float16, torch.float32, torch.float64, torch.bfloat16]
before = {str(d): products(d) for d in dtypes}
before_lstm, before_error = lstm_grads(), mismatch_error()
cpu_fp16_matmul.use_fp32_products()
cpu_fp16_matmul.use_fp32_products()  # a second call changes nothing
after = {str(d): products(d) for d in dtypes}
error = lambda products: [(p.double() - e).abs().max().item() for p, e in zip(products, exact)]
report = {
    'dtypes': {d: [new.dtype == old.dtype and bool(torch.equal(new, old)) for old, new in zip(before[d], after[d])]
               for d in before},
    'fp16_errors': [error(before['torch.float16']), error(after['torch.float16'])],
    'fp16_share_changed': [(new != old).float().mean().item()
                           for old, new in zip(before['torch.float16'], after['torch.float16'])],
    'fp16_dtypes': [str(t.dtype) for t in after['torch.float16']],
    'lstm_max_rel': max(((n.float() - o.float()).abs().max() / o.float().abs().max()).item()
                        for o, n in zip(before_lstm, lstm_grads())),
    'errors': [before_error, mismatch_error()],
}
print(json.dumps(report))
'''


@pytest.fixture(scope='module')
def report():
    proc = subprocess.run([sys.executable, '-c', COMPARE], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert 'Overriding a previously registered kernel' not in proc.stderr  # the registration is quiet
    return json.loads(proc.stdout.splitlines()[-1])


def test_other_dtypes_run_the_usual_kernels_bit_for_bit(report):
    for dtype in ('torch.float32', 'torch.float64', 'torch.bfloat16'):
        assert report['dtypes'][dtype] == [True] * 4, dtype


def test_fp16_products_are_as_exact_as_the_generic_kernels(report):
    """Both sum in fp32 and round once, so they differ only where the order of the sum does (rarely), and lie
    as close to the exact product; adding addmm's bias after rounding, or summing in fp16, would not."""
    assert report['fp16_dtypes'] == ['torch.float16'] * 4
    generic, fp32_products = report['fp16_errors']
    assert all(new <= old * 1.01 for old, new in zip(generic, fp32_products)), report['fp16_errors']
    assert all(share < 0.01 for share in report['fp16_share_changed']), report['fp16_share_changed']


def test_an_fp16_lstm_trains_on_the_same_numbers(report):
    """Forward and backward of an fp16 LSTM (its products go through aten::mm and aten::addmm)."""
    assert report['lstm_max_rel'] < 2e-3


def test_mixed_dtypes_keep_pytorchs_error(report):
    before, after = report['errors']
    assert before and after == before


CPUINFO = {  # the flag lines of /proc/cpuinfo that matter, and whether the CPU computes in fp16
    'amd-zen4': ('flags\t\t: fpu sse2 avx2 f16c avx512f avx512_bf16 avx512_vnni\n', False),
    'intel-sapphire-rapids': ('flags\t\t: fpu avx2 f16c avx512f avx512_bf16 avx512_fp16 amx_bf16\n', True),
    'arm-neoverse': ('Features\t: fp asimd evtstrm fphp asimdhp cpuid\n', True),
    'arm-without-fp16': ('Features\t: fp asimd evtstrm cpuid\n', False),
}


@pytest.mark.parametrize('cpu', list(CPUINFO))
def test_native_fp16_is_read_from_the_cpu_flags(cpu):
    text, native = CPUINFO[cpu]
    assert cpu_fp16_matmul.cpu_has_native_fp16('processor\t: 0\nmodel name\t: X\n' + text) is native


@pytest.mark.parametrize('native, flag, used', [(False, '--fp16', True), (False, '--amp', True),
                                                (False, '--bf16', False), (True, '--fp16', False),
                                                (None, '--fp16', False)])
def test_fp16_on_a_cpu_without_fp16_arithmetic_uses_fp32_products_and_says_so_once(
        native, flag, used, monkeypatch, call_script, corpus_dir, tmp_path):
    calls = []
    monkeypatch.setattr(cpu_fp16_matmul, 'cpu_has_native_fp16', lambda: native)
    monkeypatch.setattr(cpu_fp16_matmul, 'use_fp32_products', lambda: calls.append(1))
    proc = call_script('main.py', '--data', corpus_dir, '--emsize', 16, '--nhid', 16, '--batch_size', 8,
                       '--dry-run', '--epochs', 1, flag, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    expected = (f'Warning: this CPU has no fp16 arithmetic: {flag} runs its fp16 matrix products as fp32 products '
                'rounded to fp16 (plumbing/cpu_fp16_matmul.py) and is still slower than fp32 here; '
                '--bf16 is the fast low precision on a CPU.')
    assert proc.stdout.splitlines().count(expected) == (1 if used else 0), proc.stdout
    assert len(calls) == (1 if used else 0)
