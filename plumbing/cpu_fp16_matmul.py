"""fp16 matrix products at fp32 speed on a CPU without fp16 arithmetic. Plumbing: no recipe changes.

On such a CPU (AMD Zen 4, Intel before Sapphire Rapids) PyTorch has no BLAS kernel for an fp16
matrix product and falls back to a generic loop, 20-30x slower than fp32's: nearly all of an
fp16 training step goes to aten::mm and aten::addmm (benchmarks/fp16_cpu_profile.py).

That loop widens each product to fp32, sums in fp32 and rounds the result to fp16 once, which
is also what Tensor Cores do. An fp32 BLAS product of the widened inputs, rounded once to fp16,
is the same arithmetic: results differ only where the two sum in another order (1 unit in the
last place, in about 0.1% of the outputs). use_fp32_products() registers that as the CPU kernel
of aten::mm and aten::addmm through torch.library, so every fp16 product goes there, the LSTM's
and the backward pass's included. Other dtypes run the usual kernel, reached through its out=
form (a separate operator that is not replaced).
"""
import warnings

import torch

# CPU features for fp16 arithmetic: x86's AVX512-FP16 and AMX-FP16, Arm's half-precision extension.
NATIVE_FP16_FLAGS = {'avx512_fp16', 'amx_fp16', 'asimdhp', 'fphp'}

_library = None  # the registration; kept for the life of the process


def cpu_has_native_fp16(cpuinfo=None):
    """Whether the CPU computes in fp16 itself (from /proc/cpuinfo's flags); None where that cannot be read."""
    if cpuinfo is None:
        try:
            with open('/proc/cpuinfo') as f:
                cpuinfo = f.read()
        except OSError:
            return None
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(':')
        if key.strip() in ('flags', 'Features'):
            flags.update(value.split())
    return bool(flags & NATIVE_FP16_FLAGS)


def fp16_is_emulated(device):
    """Whether fp16 products on device would run in PyTorch's slow generic loop (a CPU without fp16 arithmetic)."""
    return device.type == 'cpu' and cpu_has_native_fp16() is False


def prepare(args, device):
    """At start-up: --fp16 or --amp on a CPU without fp16 arithmetic gets fp32 products, and one line saying so."""
    if (args.fp16 or args.amp) and fp16_is_emulated(device):
        use_fp32_products()
        flag = '--fp16' if args.fp16 else '--amp'
        print(f'Warning: this CPU has no fp16 arithmetic: {flag} runs its fp16 matrix products as fp32 products '
              'rounded to fp16 (plumbing/cpu_fp16_matmul.py) and is still slower than fp32 here; '
              '--bf16 is the fast low precision on a CPU.', flush=True)


def _all_fp16(*tensors):
    return all(t.dtype == torch.float16 for t in tensors)


def _mm(a, b):
    out = a.new_empty(a.size(0), b.size(1))
    if not _all_fp16(a, b):
        return torch.mm(a, b, out=out)  # the usual kernel, and its errors
    return torch.mm(a.float(), b.float(), out=out.float()).half()


def _addmm(bias, a, b, *, beta=1, alpha=1):
    out = a.new_empty(a.size(0), b.size(1))
    if not _all_fp16(bias, a, b):
        return torch.addmm(bias, a, b, beta=beta, alpha=alpha, out=out)
    # The bias joins the fp32 sum before the one rounding, as in the generic kernel.
    return torch.addmm(bias.float(), a.float(), b.float(), beta=beta, alpha=alpha, out=out.float()).half()


def use_fp32_products():
    """From now on, fp16 products on the CPU run as fp32 products rounded to fp16 (once per process)."""
    global _library
    if _library is not None:
        return
    library = torch.library.Library('aten', 'IMPL')
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message=r'(?s).*Overriding a previously registered kernel')
        library.impl('mm', _mm, 'CPU')
        library.impl('addmm', _addmm, 'CPU')
    _library = library
