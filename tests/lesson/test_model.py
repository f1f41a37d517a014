"""model.py: RNNModel and TransformerModel, their shapes, tying, errors, initialization."""
import pytest
import torch

from model import RNN_TYPES, RNNModel, TransformerModel, build_model, repackage_hidden

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


# ---------------------------------------------------------------- TransformerModel

def transformer(nhead=2, tie_weights=False, dropout=0.2):
    torch.manual_seed(0)
    return TransformerModel(NTOKEN, EMSIZE, nhead, NHID, NLAYERS, dropout=dropout, tie_weights=tie_weights)


def test_transformer_forward_shapes_and_no_hidden():
    model = transformer()
    assert model.init_hidden(3) is None
    output, hidden = model(torch.randint(NTOKEN, (7, 3)), model.init_hidden(3))
    assert output.shape == (7, 3, NTOKEN) and hidden is None
    assert repackage_hidden(hidden) is None


def test_transformer_is_causal():
    """Changing the words from position 4 on changes no output before position 4."""
    model = transformer().eval()
    inputs = torch.randint(NTOKEN, (9, 2))
    changed = inputs.clone()
    changed[4:] = (changed[4:] + 1) % NTOKEN
    with torch.no_grad():
        before, _ = model(inputs, None)
        after, _ = model(changed, None)
    assert torch.equal(before[:4], after[:4])
    assert not torch.allclose(before[4:], after[4:])


def test_transformer_tying_needs_only_emsize():
    """The decoder reads emsize-wide outputs: tying works with any feed-forward width nhid."""
    model = transformer(tie_weights=True)
    assert model.decoder.weight is model.encoder.weight and NHID != EMSIZE


def test_transformer_refuses_heads_that_do_not_divide_emsize():
    with pytest.raises(ValueError, match='multiple of --nhead'):
        TransformerModel(NTOKEN, EMSIZE, 3, NHID, 1)


def test_transformer_half_keeps_layer_norms_fp32():
    """The classic fp16 recipes call model.half(): LayerNorm weights stay fp32, all else is fp16, and it trains."""
    model = transformer().half()
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if '.norm' in name else torch.float16), name
    output, _ = model(torch.randint(NTOKEN, (5, 2)), None)
    assert output.dtype == torch.float16 and torch.isfinite(output).all()
    output.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == p.dtype for p in model.parameters())


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_transformer_runs_under_cpu_autocast(dtype):
    model = transformer()
    with torch.autocast('cpu', dtype=dtype):
        output, _ = model(torch.randint(NTOKEN, (5, 2)), None)
    assert output.dtype == dtype and torch.isfinite(output).all()


def test_build_model_picks_the_class():
    assert isinstance(build_model('GRU', NTOKEN, EMSIZE, NHID, 1, dropout=0.0, nhead=2), RNNModel)
    model = build_model('Transformer', NTOKEN, EMSIZE, NHID, 1, nhead=4)
    assert isinstance(model, TransformerModel) and model.nhead == 4
