"""fp16 and bf16 matrix products at fp32 speed on a CPU without that arithmetic. Plumbing: no recipe changes.

On such a CPU (AMD Zen 4 and Intel before Sapphire Rapids for fp16; CPUs without AVX512-BF16 or
AMX, such as AMD Zen 3, for bf16) PyTorch has no BLAS kernel for the product and falls back to a
generic loop, 20-30x slower than fp32's: nearly all of a low-precision training step goes to
aten::mm and aten::addmm (benchmarks/fp16_cpu_profile.py).

That loop widens each product to fp32, sums in fp32 and rounds the result once, which is also
what Tensor Cores do. An fp32 BLAS product of the widened inputs, rounded once, is the same
arithmetic: results differ only where the two sum in another order (1 unit in the last place,
in about 0.1% of the outputs). use_fp32_products(dtype) registers that as the CPU kernel of
aten::mm and aten::addmm through torch.library, so every product in dtype goes there, the
RNN's and the backward pass's included. Other dtypes run the usual kernel, reached through its
out= form (a separate operator that is not replaced).
"""
import warnings

import torch

# CPU features for fp16 arithmetic (x86's AVX512-FP16 and AMX-FP16, Arm's half-precision extension)
# and for bf16 (x86's AVX512-BF16 and AMX-BF16, Arm's BF16 extension).
NATIVE_FLAGS = {torch.float16: {'avx512_fp16', 'amx_fp16', 'asimdhp', 'fphp'},
                torch.bfloat16: {'avx512_bf16', 'amx_bf16', 'bf16'}}
NAMES = {torch.float16: 'fp16', torch.bfloat16: 'bf16'}

_library = None  # the registration; kept for the life of the process
_widened = set()  # the dtypes whose products run as fp32 products


def cpu_has_native(dtype, cpuinfo=None):
    """Whether the CPU computes in dtype itself (from /proc/cpuinfo's flags); None where that cannot be read."""
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
    return bool(flags & NATIVE_FLAGS[dtype])


def is_emulated(dtype, device):
    """Whether products in dtype on device would run in PyTorch's slow generic loop (a CPU without that arithmetic)."""
    return device.type == 'cpu' and cpu_has_native(dtype) is False


def prepare(args, device):
    """At start-up: --fp16, --amp or --bf16 on a CPU without that arithmetic gets fp32 products, and one line
    saying so."""
    flag = '--fp16' if args.fp16 else '--amp' if args.amp else '--bf16' if args.bf16 else None
    dtype = torch.bfloat16 if args.bf16 else torch.float16
    if flag is None or not is_emulated(dtype, device):
        return
    use_fp32_products(dtype)
    name = NAMES[dtype]
    if dtype == torch.float16 and not is_emulated(torch.bfloat16, device):
        advice = 'is still slower than fp32 here; --bf16 is the fast low precision on this CPU'
    else:
        advice = 'is no faster than fp32 here'
    print(f'Warning: this CPU has no {name} arithmetic: {flag} runs its {name} matrix products as fp32 products '
          f'rounded to {name} (plumbing/cpu_fp16_matmul.py) and {advice}.', flush=True)


def _widen(*tensors):
    """The dtype of tensors if they all have one whose products run as fp32 products, else None."""
    dtype = tensors[0].dtype
    return dtype if dtype in _widened and all(t.dtype == dtype for t in tensors) else None


def _mm(a, b):
    out = a.new_empty(a.size(0), b.size(1))
    dtype = _widen(a, b)
    if dtype is None:
        return torch.mm(a, b, out=out)  # the usual kernel, and its errors
    return torch.mm(a.float(), b.float(), out=out.float()).to(dtype)


def _addmm(bias, a, b, *, beta=1, alpha=1):
    out = a.new_empty(a.size(0), b.size(1))
    dtype = _widen(bias, a, b)
    if dtype is None:
        return torch.addmm(bias, a, b, beta=beta, alpha=alpha, out=out)
    # The bias joins the fp32 sum before the one rounding, as in the generic kernel.
    return torch.addmm(bias.float(), a.float(), b.float(), beta=beta, alpha=alpha, out=out.float()).to(dtype)


def use_fp32_products(dtype=torch.float16):
    """From now on, products in dtype on the CPU run as fp32 products rounded to dtype."""
    global _library
    _widened.add(dtype)
    if _library is not None:
        return
    library = torch.library.Library('aten', 'IMPL')
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message=r'(?s).*Overriding a previously registered kernel')
        library.impl('mm', _mm, 'CPU')
        library.impl('addmm', _addmm, 'CPU')
    _library = library
