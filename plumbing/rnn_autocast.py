"""The RNN under autocast, where autocast's own choice of precision does not fit the device."""
import functools
import warnings

import torch


def run_rnn(rnn, input, hidden):
    """rnn(input, hidden), in the precision rnn_dtype chooses where it overrules autocast."""
    device_type = input.device.type
    if not torch.is_autocast_enabled(device_type):
        return rnn(input, hidden)
    dtype = rnn_dtype(isinstance(rnn, torch.nn.LSTM), device_type, torch.get_autocast_dtype(device_type),
                      device_type == 'cuda' and cudnn_runs_bf16_rnn(input.device))
    if dtype is None:
        return rnn(input, hidden)
    with torch.autocast(device_type, enabled=False):
        return run_rnn_in(rnn, dtype, input, hidden)


def rnn_dtype(is_lstm, device_type, autocast_dtype, cudnn_bf16=True):
    """The dtype an RNN runs in under autocast to autocast_dtype where this code chooses it instead of
    autocast; None leaves it to autocast. cudnn_bf16: whether cuDNN has bf16 RNN kernels (CUDA only)."""
    if autocast_dtype == torch.bfloat16 and device_type == 'cuda':
        # Autocast's wrapper for cuDNN RNNs casts to fp16 whatever the autocast dtype, which would run
        # --bf16's RNN in fp16 without a loss scale. cuDNN 9.13 on Ampere or later has bf16 RNNs;
        # without them, fp32 (TF32 where allowed) is the safe precision.
        return torch.bfloat16 if cudnn_bf16 else torch.float32
    if autocast_dtype == torch.bfloat16 and device_type == 'cpu':
        # Under CPU bf16 autocast an LSTM fed fp32 goes to oneDNN, which fails on a CPU without
        # AVX-512 (an AVX2 EPYC: "could not create a primitive descriptor"); fed bf16 it runs in bf16.
        return torch.bfloat16
    if autocast_dtype == torch.float16 and device_type == 'cpu' and is_lstm:
        # oneDNN has no fp16 LSTM kernel: under CPU fp16 autocast the LSTM runs in fp32.
        return torch.float32
    return None


@functools.cache
def cudnn_runs_bf16_rnn(device):
    """Whether cuDNN runs bf16 RNNs on this device: PyTorch sends them to cuDNN from cuDNN 9.13, on
    compute capability 8.0 or later (pytorch/pytorch#164411)."""
    return (torch.backends.cudnn.is_available() and torch.backends.cudnn.version() >= 91300
            and torch.cuda.get_device_capability(device) >= (8, 0))


def run_rnn_in(rnn, dtype, input, hidden):
    """rnn(input, hidden) computed in dtype: input, hidden and a copy of the weights in dtype. The copy is
    made inside the graph, so the gradients reach the fp32 weights."""
    if hidden is not None:
        hidden = tuple(h.to(dtype) for h in hidden) if isinstance(hidden, tuple) else hidden.to(dtype)
    weights = {name: p.to(dtype) for name, p in rnn.named_parameters()}
    with warnings.catch_warnings():
        # The copies are not one flat buffer, so cuDNN packs them into one per call (and warns each
        # time): one copy more than autocast's fp16 wrapper, which casts straight into a flat buffer.
        warnings.filterwarnings('ignore', message='RNN module weights are not part of single contiguous chunk')
        return torch.func.functional_call(rnn, weights, (input.to(dtype), hidden))
