"""In which precision a profiled training step ran its matrix products: the RNN's (or the Transformer's)
and the decoder's, read from the profiler.

On CUDA the kernels' own names say it (cuBLAS, cuDNN and CUTLASS name the data type); on the CPU
the operators' input dtypes do. benchmarks/recipes.py --profile records this for every recipe,
and benchmarks/gpu_check.py checks it against what each recipe promises.
"""
import re

# The operators whose kernels are matrix products (or a whole cuDNN RNN, GEMMs and cell together).
MATMUL_OPS = {'aten::mm', 'aten::addmm', 'aten::bmm', 'aten::baddbmm', 'aten::_cudnn_rnn', 'aten::_cudnn_rnn_backward',
              'aten::mkldnn_rnn_layer', 'aten::mkldnn_rnn_layer_backward',
              'aten::_scaled_dot_product_flash_attention', 'aten::_scaled_dot_product_efficient_attention',
              'aten::_scaled_dot_product_cudnn_attention', 'aten::_flash_attention_backward',
              'aten::_efficient_attention_backward', 'aten::_scaled_dot_product_flash_attention_backward',
              'aten::_scaled_dot_product_efficient_attention_backward'}
CPU_DTYPES = {'float': 'fp32', 'c10::Half': 'fp16', 'c10::BFloat16': 'bf16', 'double': 'fp64'}
# cuBLAS's nvjet kernels name their types in three letters (A and B, compute, C): nvjet_sm90_hsh_...
# is fp16 in and out with fp32 compute; t is TF32, b bf16, s fp32.
NVJET = re.compile(r'nvjet_sm\d+_([hbste])([hbste])([hbste])_')
NVJET_TYPES = {'h': 'fp16', 'b': 'bf16', 's': 'fp32', 't': 'tf32', 'e': 'fp8'}
# Other kernels name them in words: legacy cuBLAS (ampere_sgemm, sm80_xmma_gemm_bf16bf16_...,
# h16816gemm), CUTLASS (tensorop_s1688gemm: TF32 on fp32 data) and cuDNN's templates (<__half, ...>).
NAMED = [
    ('bf16', re.compile(r'bf16|bfloat16|__nv_bfloat16', re.I)),
    ('fp16', re.compile(r'f16|fp16|__half|half|hgemm|h884|h1688|h16816|hmma', re.I)),
    ('tf32', re.compile(r'tf32|tensorop_s1688|tensorop_s16816|s1688gemm|s16816gemm', re.I)),
    ('fp32', re.compile(r'sgemm|f32|fp32|float|sss', re.I)),
]


def kernel_dtype(name):
    """The data type a CUDA kernel's name gives, or 'unknown'."""
    match = NVJET.search(name)
    if match:
        return NVJET_TYPES[match.group(1)]
    for dtype, pattern in NAMED:
        if pattern.search(name):
            return dtype
    return 'unknown'


def part_of(event, ntokens, body):
    """'decoder' for an operator that touches the vocabulary (a dimension ntokens long), else body."""
    shapes = getattr(event, 'input_shapes', None) or []
    return 'decoder' if any(ntokens in shape for shape in shapes if isinstance(shape, (list, tuple))) else body


def matmul_dtypes(prof, ntokens, body='rnn', top=3):
    """{part: {'dtypes': sorted data types, 'top': [[kernel or operator, microseconds, dtype], ...]}} for
    the body ('rnn' or 'transformer') and the decoder. Needs a profile taken with record_shapes=True."""
    seen = {}
    for event in prof.events():
        if event.name not in MATMUL_OPS:
            continue
        part = part_of(event, ntokens, body)
        kernels = getattr(event, 'kernels', None) or []
        if kernels:  # CUDA: the kernels this operator launched
            items = [(k.name, k.duration, kernel_dtype(k.name)) for k in kernels]
        else:  # CPU: the operator itself, its first floating-point input's dtype
            dtype = next((CPU_DTYPES[t] for t in event.input_dtypes if t in CPU_DTYPES), 'unknown')
            items = [(event.name, event.cpu_time_total, dtype)]
        for name, us, dtype in items:
            entry = seen.setdefault(part, {}).setdefault(name, [0.0, dtype])
            entry[0] += us
    result = {}
    for part, by_name in seen.items():
        ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])
        result[part] = {'dtypes': sorted({dtype for _, (_, dtype) in ranked if dtype != 'unknown'}),
                        'top': [[name, round(us, 1), dtype] for name, (us, dtype) in ranked[:top]]}
    return result


def describe(dtypes):
    """One line: 'rnn fp16 (nvjet_sm90_hsh_..., ...); decoder fp16 (...)'."""
    return '; '.join(f"{part} {'/'.join(d['dtypes']) or '?'} ({', '.join(name for name, _, _ in d['top'])})"
                     for part, d in sorted(dtypes.items()))
