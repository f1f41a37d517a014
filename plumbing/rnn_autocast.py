"""The RNN under autocast, where autocast's own choice does not fit the device."""
import functools

import torch


def run_rnn(rnn, input, hidden):
    """rnn(input, hidden) in the precision autocast gives it, except where the CPU has no kernel for
    it: oneDNN has no fp16 LSTM, and a bf16 LSTM only on some CPUs (with AVX-512); such an LSTM runs in fp32."""
    if isinstance(rnn, torch.nn.LSTM) and input.device.type == 'cpu' and torch.is_autocast_enabled('cpu') \
            and not cpu_lstm_runs_in(torch.get_autocast_dtype('cpu')):
        with torch.autocast('cpu', enabled=False):
            return rnn(input.float(), hidden)
    return rnn(input, hidden)


@functools.cache
def cpu_lstm_runs_in(dtype):
    """Whether this CPU runs an LSTM under autocast to dtype: never fp16; bf16 where oneDNN can (tried once)."""
    if dtype == torch.float16:
        return False
    try:
        with torch.autocast('cpu', dtype=dtype):
            torch.nn.LSTM(8, 8)(torch.zeros(1, 1, 8))
        return True
    except RuntimeError:
        return False
