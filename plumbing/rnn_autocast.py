"""The RNN under autocast, where autocast's own choice does not fit the device."""
import torch


def run_rnn(rnn, input, hidden):
    """rnn(input, hidden); but oneDNN has no fp16 LSTM kernel, so under the CPU's fp16 autocast an LSTM runs in fp32."""
    if isinstance(rnn, torch.nn.LSTM) and input.device.type == 'cpu' and torch.is_autocast_enabled('cpu') \
            and torch.get_autocast_dtype('cpu') == torch.float16:
        with torch.autocast('cpu', enabled=False):
            return rnn(input.float(), hidden)
    return rnn(input, hidden)
