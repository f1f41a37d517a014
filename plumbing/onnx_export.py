"""--onnx-export: the best model as an ONNX graph, in fp32, written by torch.onnx.export.

The exporter (torch.export-based, PyTorch's default since 2.9) needs the packages onnx and
onnxscript, which the scripts do not otherwise need: requirements-onnx.txt lists them.
"""
import importlib.util
import logging
import warnings

import torch

from plumbing import checkpoint
from plumbing.files import atomic_write

EXPORTER_PACKAGES = ('onnx', 'onnxscript')


def missing_packages():
    """The exporter's packages that are not installed (looked up without importing them)."""
    return [name for name in EXPORTER_PACKAGES if importlib.util.find_spec(name) is None]


def export(checkpoint_path, path, seq_len):
    """Write the model of a best-model checkpoint to path as ONNX, atomically.

    The graph computes model(input, hidden) -> (logits, next hidden) for an input of [seq_len, 1]
    word ids and a hidden state shaped like the model's init_hidden(1) (none for a model that
    returns None there). Its inputs are named input and hidden (an LSTM's: hidden_h, hidden_c),
    its outputs logits and next_hidden (next_hidden_h, next_hidden_c). The shapes are fixed: torch 2.13's exporter bakes an LSTM's sequence
    length into the graph even when asked for a dynamic one. The model is the fp32 copy
    load_model makes, in eval mode, so an fp16-trained model exports in fp32 and without dropout.
    """
    model, _, _ = checkpoint.load_model(checkpoint_path)
    model.eval()
    example = (torch.zeros(seq_len, 1, dtype=torch.long), model.init_hidden(1))
    # The exporter's warnings and log lines are about its own internals (torchvision's absent ops, the
    # Transformer's None hidden state): nothing to act on. Its errors still raise.
    exporter_log = logging.getLogger('torch.onnx')
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            program = torch.onnx.export(model, example, dynamo=True, verbose=False,
                                        input_names=['input', *state_names(model, 'hidden')],
                                        output_names=['logits', *state_names(model, 'next_hidden')])
    finally:
        exporter_log.setLevel(level)
    with atomic_write(path) as f:
        f.write(program.model_proto.SerializeToString())


def state_names(model, name):
    """The graph's names for the model's hidden state: none for the Transformer, two for an LSTM's (h, c)."""
    hidden = model.init_hidden(1)
    if hidden is None:
        return []
    return [f'{name}_h', f'{name}_c'] if isinstance(hidden, tuple) else [name]
