"""main.py's ManualFP16Recipe: fp32 masters, unscaling, clipping, skipped steps, its state."""
import copy

import pytest
import torch
import torch.nn.functional as F

import main
from model import RNNModel

NTOKEN, BSZ, SEQ = 40, 4, 6


def tiny_model(seed=0, tied=False):
    torch.manual_seed(seed)
    return RNNModel('LSTM', NTOKEN, 16, 16, 1, dropout=0.0, tie_weights=tied)


def recipe(model, scale=128.0, lr=0.5, clip=1e9):
    return main.ManualFP16Recipe(model, lr=lr, clip=clip, loss_scale=scale)


def batch(seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(NTOKEN, (SEQ, BSZ), generator=g), torch.randint(NTOKEN, (SEQ * BSZ,), generator=g)


def loss_of(model, inputs, targets):
    out, _ = model(inputs, model.init_hidden(BSZ))
    return F.cross_entropy(out.view(-1, NTOKEN).float(), targets)


def test_model_is_half_and_masters_are_fp32_copies():
    model = tiny_model()
    fp32 = {k: v.clone() for k, v in model.state_dict().items()}
    r = recipe(model)
    assert all(p.dtype == torch.float16 for p in model.parameters())
    params = list(model.parameters())
    assert len(r.model_params) == len(params) == len(r.master_params)
    for p, m in zip(params, r.master_params):
        assert m.dtype == torch.float32 and m.shape == p.shape
        assert torch.equal(m, p.float())
        assert m.data_ptr() != p.data_ptr()
    # the masters hold the weights rounded to fp16 (the model's own), not other values
    for (name, w), m in zip(model.named_parameters(), r.master_params):
        torch.testing.assert_close(m, fp32[name], rtol=1e-3, atol=1e-4)
    assert r.loss_scale == 128.0 and r.optimizer.param_groups[0]['lr'] == 0.5
    assert r.name == 'fp16-manual'
    assert r.describe() == 'fp16, manual fp32 master weights, static loss scale 128'
    # SGD sees only the fp32 masters
    assert [id(p) for group in r.optimizer.param_groups for p in group['params']] == list(map(id, r.master_params))
    with r.autocast():  # the model itself is fp16: nothing is autocast
        assert not torch.is_autocast_enabled('cpu')


@pytest.mark.parametrize('scale', [1.0, 128.0, 1024.0])
def test_step_unscales_and_updates_masters(scale):
    model = tiny_model()
    lr = 0.5
    r = recipe(model, scale=scale, lr=lr)
    twin = copy.deepcopy(model)  # the same half model, to see the scaled fp16 grads
    inputs, targets = batch()
    (loss_of(twin, inputs, targets) * scale).backward()
    scaled_grads = [p.grad.clone() for p in twin.parameters()]
    masters_before = [m.detach().clone() for m in r.master_params]
    assert r.step(loss_of(model, inputs, targets)) is True
    for m, g, m0, p in zip(r.master_params, scaled_grads, masters_before, model.parameters()):
        expected_grad = g.float() / scale
        torch.testing.assert_close(m.grad, expected_grad, rtol=0, atol=0)
        torch.testing.assert_close(m.detach(), m0 - lr * expected_grad, rtol=1e-6, atol=1e-7)
        assert torch.equal(p, m.detach().half())  # the model follows the masters
        assert p.grad is None  # the model's grads are released
    assert any(not torch.equal(m0, m) for m0, m in zip(masters_before, r.master_params))


def test_step_clips_the_unscaled_gradient():
    model = tiny_model()
    r = recipe(model, scale=64.0, lr=1.0, clip=1e-3)
    masters_before = [m.detach().clone() for m in r.master_params]
    assert r.step(loss_of(model, *batch()))
    total = torch.cat([m.grad.reshape(-1) for m in r.master_params]).norm()
    torch.testing.assert_close(total, torch.tensor(1e-3), rtol=1e-4, atol=0)
    moved = torch.cat([(m.detach() - m0).reshape(-1) for m, m0 in zip(r.master_params, masters_before)])
    torch.testing.assert_close(moved.norm(), torch.tensor(1e-3), rtol=1e-3, atol=0)


def test_overflow_from_huge_scale_skips_step(capsys):
    """A skipped update leaves model and masters as they were; the recipe says so by returning False,
    and leaves counting and reporting to the training loop."""
    model = tiny_model()
    r = recipe(model, scale=2.0 ** 40)  # scaled grads overflow fp16
    weights = [p.detach().clone() for p in model.parameters()]
    masters = [m.detach().clone() for m in r.master_params]
    assert r.step(loss_of(model, *batch())) is False
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))
    assert all(torch.equal(m0, m) for m0, m in zip(masters, r.master_params))
    assert all(p.grad is None for p in model.parameters())
    assert r.step(loss_of(model, *batch(4))) is False
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))
    assert r.loss_scale == 2.0 ** 40  # static: a skip does not change it
    assert 'not finite' not in capsys.readouterr().out  # the loop reports skips, not the recipe


def test_inf_gradient_from_hook_skips_step_then_recovers():
    model = tiny_model(tied=True)
    r = recipe(model, scale=128.0)
    weights = [p.detach().clone() for p in model.parameters()]
    masters = [m.detach().clone() for m in r.master_params]

    def poison(grad):
        grad = grad.clone()
        grad.view(-1)[0] = float('inf')
        return grad

    handle = model.decoder.bias.register_hook(poison)
    assert r.step(loss_of(model, *batch())) is False
    handle.remove()
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))
    assert all(torch.equal(m0, m) for m0, m in zip(masters, r.master_params))
    assert all(p.grad is None for p in model.parameters())  # no stale grads carried over
    # a clean step afterwards updates the weights
    assert r.step(loss_of(model, *batch())) is True
    assert any(not torch.equal(w, p) for w, p in zip(weights, model.parameters()))
    assert model.decoder.weight is model.encoder.weight


def test_nan_loss_skips_step():
    model = tiny_model()
    r = recipe(model)
    weights = [p.detach().clone() for p in model.parameters()]
    loss = loss_of(model, *batch()) * float('nan')
    assert r.step(loss) is False
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))


def test_small_updates_accumulate_in_masters():
    """The point of fp32 masters: updates below fp16's resolution are kept, not rounded away."""
    model = tiny_model()
    r = recipe(model, scale=128.0, lr=1e-6)
    masters0 = [m.detach().clone() for m in r.master_params]
    inputs, targets = batch()
    for _ in range(3):
        assert r.step(loss_of(model, inputs, targets))
    moved = sum(int((m.detach() != m0).sum()) for m, m0 in zip(r.master_params, masters0))
    assert moved > 0


def test_state_dict_restores_masters_and_optimizer():
    """What --resume restores: a fresh recipe loaded with another's state holds its masters and its
    optimizer's state (the learning rate), and copies the masters into its fp16 model."""
    model = tiny_model()
    r = recipe(model, lr=0.5)
    assert r.step(loss_of(model, *batch()))
    state = r.state_dict()
    assert all(m.dtype == torch.float32 for m in state['masters'])
    other_model = tiny_model(seed=1)
    other = recipe(other_model, lr=0.1)
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.master_params, r.master_params))
    assert all(torch.equal(a, b) for a, b in zip(other_model.parameters(), model.parameters()))
    assert other.optimizer.param_groups[0]['lr'] == 0.5
    # the saved masters are copies: stepping on does not change the state already taken
    assert r.step(loss_of(model, *batch(5)))
    assert any(not torch.equal(m, s) for m, s in zip(r.master_params, state['masters']))


def test_state_dict_of_another_shape_is_refused():
    r = recipe(tiny_model())
    state = recipe(RNNModel('LSTM', NTOKEN, 24, 16, 1, dropout=0.0)).state_dict()
    with pytest.raises(ValueError, match='other shapes'):
        r.load_state_dict(state)
