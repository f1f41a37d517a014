"""model.py: RNNModel shapes, tying, errors, init_hidden, initialization."""
import pytest
import torch

from model import RNN_TYPES, RNNModel, repackage_hidden

NTOKEN, EMSIZE, NHID, NLAYERS = 48, 16, 24, 2


@pytest.mark.parametrize('rnn_type', ['LSTM', 'GRU', 'RNN_TANH', 'RNN_RELU'])
def test_forward_shapes(rnn_type):
    torch.manual_seed(0)
    model = RNNModel(rnn_type, NTOKEN, EMSIZE, NHID, NLAYERS, dropout=0.2)
    seq, batch = 7, 3
    hidden = model.init_hidden(batch)
    inputs = torch.randint(NTOKEN, (seq, batch))
    output, new_hidden = model(inputs, hidden)
    assert output.shape == (seq, batch, NTOKEN)
    if rnn_type == 'LSTM':
        assert isinstance(new_hidden, tuple) and len(new_hidden) == 2
        for h in (*hidden, *new_hidden):
            assert h.shape == (NLAYERS, batch, NHID)
    else:
        assert isinstance(new_hidden, torch.Tensor)
        assert hidden.shape == new_hidden.shape == (NLAYERS, batch, NHID)
    # the new hidden state carries information (it is not the zero initial state)
    flat = new_hidden[0] if rnn_type == 'LSTM' else new_hidden
    assert flat.abs().sum() > 0


def test_rnn_nonlinearity():
    assert RNNModel('RNN_TANH', NTOKEN, EMSIZE, NHID, 1, dropout=0.0).rnn.nonlinearity == 'tanh'
    assert RNNModel('RNN_RELU', NTOKEN, EMSIZE, NHID, 1, dropout=0.0).rnn.nonlinearity == 'relu'
    assert isinstance(RNNModel('GRU', NTOKEN, EMSIZE, NHID, 1, dropout=0.0).rnn, torch.nn.GRU)
    assert isinstance(RNNModel('LSTM', NTOKEN, EMSIZE, NHID, 1, dropout=0.0).rnn, torch.nn.LSTM)


def test_tied_weights_share_storage():
    model = RNNModel('LSTM', NTOKEN, 16, 16, 1, dropout=0.0, tie_weights=True)
    assert model.decoder.weight is model.encoder.weight
    assert model.decoder.weight.data_ptr() == model.encoder.weight.data_ptr()
    # still shared after conversion to half
    model.half()
    assert model.decoder.weight.data_ptr() == model.encoder.weight.data_ptr()
    # one parameter, not two
    n_params = sum(p.numel() for p in model.parameters())
    untied = RNNModel('LSTM', NTOKEN, 16, 16, 1, dropout=0.0, tie_weights=False)
    assert sum(p.numel() for p in untied.parameters()) - n_params == NTOKEN * 16


def test_untied_weights_are_separate():
    model = RNNModel('LSTM', NTOKEN, 16, 16, 1, dropout=0.0)
    assert model.decoder.weight.data_ptr() != model.encoder.weight.data_ptr()


def test_tie_with_different_sizes_raises():
    with pytest.raises(ValueError, match='emsize'):
        RNNModel('LSTM', NTOKEN, 16, 32, 1, dropout=0.0, tie_weights=True)


def test_unknown_type_lists_choices():
    with pytest.raises(ValueError) as e:
        RNNModel('TRANSFORMER', NTOKEN, 16, 16, 1, dropout=0.0)
    message = str(e.value)
    assert 'TRANSFORMER' in message
    for choice in RNN_TYPES:
        assert choice in message


@pytest.mark.parametrize('rnn_type', ['LSTM', 'GRU'])
def test_init_hidden_follows_dtype_and_device(rnn_type):
    model = RNNModel(rnn_type, NTOKEN, EMSIZE, NHID, NLAYERS)
    h = model.init_hidden(5)
    hs = h if isinstance(h, tuple) else (h,)
    assert all(t.dtype == torch.float32 and t.device.type == 'cpu' for t in hs)
    assert all(torch.count_nonzero(t) == 0 for t in hs)
    model.half()
    h = model.init_hidden(5)
    hs = h if isinstance(h, tuple) else (h,)
    assert all(t.dtype == torch.float16 and t.shape == (NLAYERS, 5, NHID) for t in hs)
    # a half model runs with its own hidden state
    out, _ = model(torch.randint(NTOKEN, (3, 5)), h)
    assert out.dtype == torch.float16
    model.to('meta')
    h = model.init_hidden(5)
    hs = h if isinstance(h, tuple) else (h,)
    assert all(t.device.type == 'meta' for t in hs)


def test_init_weights_ranges():
    torch.manual_seed(0)
    model = RNNModel('LSTM', 500, 32, 32, 1, dropout=0.0)
    for w in (model.encoder.weight, model.decoder.weight):
        assert w.abs().max() <= 0.1
        assert w.std() > 0.04  # uniform(-0.1, 0.1) has std 0.0577: not zeros, not a tiny range
    assert torch.count_nonzero(model.decoder.bias) == 0


def test_repackage_hidden_detaches():
    model = RNNModel('LSTM', NTOKEN, EMSIZE, NHID, 1, dropout=0.0)
    _, hidden = model(torch.randint(NTOKEN, (3, 2)), model.init_hidden(2))
    assert all(h.requires_grad for h in hidden)
    detached = repackage_hidden(hidden)
    assert isinstance(detached, tuple)
    assert all(not h.requires_grad and torch.equal(h, g) for h, g in zip(detached, hidden))
