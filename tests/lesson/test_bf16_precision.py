"""--bf16 computes in bf16 (or fp32), never in unscaled fp16; --amp runs the RNN in fp16 with a loss scale.

The CPU runs the real training step under the profiler and reads the dtypes every operator saw.
The CUDA choice cannot run here: its decision (plumbing/rnn_autocast.py) is checked as a function, and the
GPU check (benchmarks/gpu_check.sh) reads the kernel names on a GPU.
"""

import pytest
import torch

import recipes
import training
from model import RNN_TYPES, build_model
from plumbing.rnn_autocast import rnn_dtype

HALF, BF16 = 'c10::Half', 'c10::BFloat16'
RNN_OPS = {'LSTM': 'aten::lstm', 'GRU': 'aten::gru', 'RNN_TANH': 'aten::rnn_tanh'}


def profiled_step(model_type, autocast_dtype):
    """One training step (forward, backward, update) of a tiny model under the recipe of
    autocast_dtype: the recipe, and {operator name: set of its inputs' dtypes}."""
    torch.manual_seed(0)
    model = build_model(model_type, 64, 16, 16, 2, 0.2, nhead=2)
    recipe = recipes.AutocastRecipe(model, lr=1.0, clip=0.25, autocast_dtype=autocast_dtype)
    data = torch.randint(64, (11, 4))
    hidden = model.init_hidden(4)
    with torch.profiler.profile(record_shapes=True) as prof:
        training.train_batch(model, recipe, data[:10], data[1:].reshape(-1), hidden)
    dtypes = {}
    for event in prof.events():
        dtypes.setdefault(event.name, set()).update(event.input_dtypes)
        # The RNN's own forward: what the operators inside aten::lstm (gru, rnn_tanh) saw.
        parent = event.cpu_parent
        while parent is not None and parent.name not in RNN_OPS.values():
            parent = parent.cpu_parent
        if parent is not None:
            dtypes.setdefault('inside the RNN', set()).update(event.input_dtypes)
    return recipe, dtypes


def ops_with(dtypes, dtype):
    return sorted(name for name, seen in dtypes.items() if dtype in seen)


@pytest.mark.parametrize('model_type', ['LSTM', 'GRU', 'Transformer'])
def test_bf16_runs_nothing_in_fp16(model_type):
    recipe, dtypes = profiled_step(model_type, torch.bfloat16)
    assert ops_with(dtypes, HALF) == []
    assert recipe.loss_scale is None
    # Not vacuous: the matrix products did run in bf16.
    assert {'aten::addmm', 'aten::mm'} & set(ops_with(dtypes, BF16)), dtypes
    if model_type in RNN_OPS:
        assert BF16 in dtypes[RNN_OPS[model_type]] and BF16 in dtypes['inside the RNN']


@pytest.mark.parametrize('model_type', ['GRU', 'RNN_TANH'])
def test_amp_runs_the_rnn_in_fp16_with_a_loss_scale(model_type):
    recipe, dtypes = profiled_step(model_type, torch.float16)
    assert HALF in dtypes['inside the RNN']
    assert recipe.scaler.is_enabled() and recipe.loss_scale == 2.0 ** 16


def test_amp_runs_the_cpu_lstm_in_fp32_as_model_py_says():
    # oneDNN has no fp16 LSTM kernel (plumbing/rnn_autocast.py); the decoder still runs in fp16, scaled.
    recipe, dtypes = profiled_step('LSTM', torch.float16)
    assert 'float' in dtypes['aten::lstm'] and not {HALF, BF16} & (dtypes['aten::lstm'] | dtypes['inside the RNN'])
    assert HALF in dtypes['aten::addmm']
    assert recipe.loss_scale == 2.0 ** 16


@pytest.mark.parametrize('rnn_type', RNN_TYPES)
def test_rnn_dtype_on_cuda(rnn_type):
    # bf16 autocast would run the cuDNN RNN in fp16: the model runs it in bf16 where cuDNN can, else fp32.
    assert rnn_dtype(rnn_type == 'LSTM', 'cuda', torch.bfloat16, cudnn_bf16=True) is torch.bfloat16
    assert rnn_dtype(rnn_type == 'LSTM', 'cuda', torch.bfloat16, cudnn_bf16=False) is torch.float32
    # fp16 autocast (--amp) keeps autocast's own choice, fp16 under a GradScaler.
    assert rnn_dtype(rnn_type == 'LSTM', 'cuda', torch.float16) is None


@pytest.mark.parametrize('rnn_type', RNN_TYPES)
def test_rnn_dtype_on_the_cpu(rnn_type):
    assert rnn_dtype(rnn_type == 'LSTM', 'cpu', torch.bfloat16) is torch.bfloat16
    assert rnn_dtype(rnn_type == 'LSTM', 'cpu', torch.float16) is (torch.float32 if rnn_type == 'LSTM' else None)
