"""fp16_utils.py: master-weight helpers, loss scalers, FP16_Optimizer."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fp16_utils
from fp16_utils import (DynamicLossScaler, FP16_Optimizer, LossScaler, master_params_to_model_params,
                        model_grads_to_master_grads, network_to_half, prep_param_lists, to_python_float)
from model import RNNModel

INF = float('inf')

def grads_to_masters_unscaled(model_params, masters, scale, flat=False):
    """model grads -> master grads / scale with the helpers; True on overflow."""
    overflow = not math.isfinite(fp16_utils.grad_norm(model_params))
    model_grads_to_master_grads(model_params, masters, flat_master=flat, loss_scale=scale)
    return overflow


def half_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).half()


def batches(n, seed=100):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 8, generator=g), torch.randn(6, 4, generator=g)) for _ in range(n)]


def mlp_loss(model, x, y):
    dtype = next(model.parameters()).dtype
    return F.mse_loss(model(x.to(dtype)).float(), y)


def fill_grads(params, seed=7, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * scale).to(p.dtype)


# ---------------------------------------------------------------- helpers

def test_prep_param_lists_per_param():
    model = half_mlp()
    model[0].bias.requires_grad_(False)
    model_params, masters = prep_param_lists(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(model_params) == len(trainable) == 3
    assert all(a is b for a, b in zip(model_params, trainable))
    assert len(masters) == 3
    for p, m in zip(model_params, masters):
        assert m.dtype == torch.float32 and isinstance(m, nn.Parameter) and m.requires_grad
        assert m.shape == p.shape
        assert torch.equal(m, p.float())
        assert m.data_ptr() != p.data_ptr()


def test_prep_param_lists_flat():
    model = half_mlp()
    model_params, masters = prep_param_lists(model, flat_master=True)
    assert len(masters) == 1
    flat = masters[0]
    total = sum(p.numel() for p in model.parameters())
    assert flat.dtype == torch.float32 and flat.dim() == 1 and flat.numel() == total
    assert flat.is_contiguous()
    assert torch.equal(flat, torch.cat([p.detach().float().reshape(-1) for p in model_params]))


def test_prep_param_lists_flat_mixed_dtypes_raises():
    model = half_mlp()
    model[2].float()
    with pytest.raises(ValueError):
        prep_param_lists(model, flat_master=True)


def test_model_grads_to_master_grads_and_back():
    model = half_mlp()
    model_params, masters = prep_param_lists(model)
    fill_grads(model_params)
    model_params[1].grad = None  # a param without a grad
    model_grads_to_master_grads(model_params, masters)
    for p, m in zip(model_params, masters):
        if p.grad is None:
            assert m.grad is None
        else:
            assert m.grad.dtype == torch.float32
            assert torch.equal(m.grad, p.grad.float())
    # master -> model: rounded to half
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in masters:
            m.copy_(torch.randn(m.shape, generator=g))
    master_params_to_model_params(model_params, masters)
    for p, m in zip(model_params, masters):
        assert p.dtype == torch.float16
        assert torch.equal(p, m.half())


def test_flat_grads_to_master_and_back():
    model = half_mlp()
    model_params, masters = prep_param_lists(model, flat_master=True)
    fill_grads(model_params)
    model_grads_to_master_grads(model_params, masters, flat_master=True)
    expected = torch.cat([p.grad.float().reshape(-1) for p in model_params])
    assert torch.equal(masters[0].grad, expected)
    with torch.no_grad():
        masters[0].copy_(torch.linspace(-2, 2, masters[0].numel()))
    master_params_to_model_params(model_params, masters, flat_master=True)
    offset = 0
    for p in model_params:
        n = p.numel()
        assert torch.equal(p, masters[0][offset:offset + n].view_as(p).half())
        offset += n


@pytest.mark.parametrize('flat', [False, True])
def test_model_grads_to_master_grads_unscales(flat):
    model = half_mlp()
    model_params, masters = prep_param_lists(model, flat_master=flat)
    fill_grads(model_params, scale=300.0)
    for scale in (1.0, 128.0, 3.0):
        model_grads_to_master_grads(model_params, masters, flat_master=flat, loss_scale=scale)
        expected = [p.grad.float() / scale for p in model_params]
        got = [masters[0].grad] if flat else [m.grad for m in masters]
        if flat:
            expected = [torch.cat([e.reshape(-1) for e in expected])]
        for g, e in zip(got, expected):
            assert g.dtype == torch.float32
            # exact for powers of 2; for 3 the fp32 product with 1/3 is within an ulp or two
            rtol = 0 if scale != 3.0 else 3e-7
            torch.testing.assert_close(g, e, rtol=rtol, atol=0)


def test_grad_norm():
    grad_norm = fp16_utils.grad_norm
    model = half_mlp()
    params = list(model.parameters())
    fill_grads(params, scale=300.0)  # fp16 grads whose squares overflow fp16: the norm must not
    params[1].grad = None
    expected = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None))
    norm = grad_norm(params)
    assert isinstance(norm, float)
    assert norm == pytest.approx(expected, rel=1e-5)
    for bad in (INF, -INF, float('nan')):
        fill_grads(params)
        params[2].grad[0, 0] = bad
        assert not math.isfinite(grad_norm(params))
    assert grad_norm([nn.Parameter(torch.zeros(2))]) == 0.0


def test_to_python_float():
    assert to_python_float(torch.tensor([3.5])) == 3.5 and isinstance(to_python_float(torch.tensor([3.5])), float)
    assert to_python_float(torch.tensor(2.25, dtype=torch.float16)) == 2.25


def test_to_python_float_of_a_number():
    # The docstring promises "a one-element tensor (or a number)".
    assert to_python_float(2.5) == 2.5
    assert to_python_float(3) == 3.0


def test_network_to_half():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    half = network_to_half(net)
    assert isinstance(half[0], fp16_utils.tofp16)
    assert half[0](torch.randn(3, 4)).dtype == torch.float16
    inner = half[1]
    assert inner[0].weight.dtype == torch.float16 and inner[3].weight.dtype == torch.float16
    bn = inner[1]
    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
        assert t.dtype == torch.float32
    # an fp32 input goes through
    out = half(torch.randn(5, 4))
    assert out.shape == (5, 2) and out.dtype == torch.float16


def test_network_to_half_nested_batchnorm():
    net = nn.Sequential(nn.Sequential(nn.Conv1d(2, 3, 1), nn.BatchNorm1d(3)), nn.Linear(4, 4))
    half = network_to_half(net)
    assert half[1][0][1].weight.dtype == torch.float32
    assert half[1][0][0].weight.dtype == torch.float16


# ---------------------------------------------------------------- loss scalers

def test_static_loss_scaler():
    s = LossScaler(128)
    assert s.loss_scale == 128.0
    for overflow in (True, False, True):
        s.update_scale(overflow)
        assert s.loss_scale == 128.0
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    s.backward((w * w).sum())
    assert torch.equal(w.grad, torch.tensor([256.0, 512.0]))
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([1.0, INF])
    assert s.has_overflow([p]) is True
    p.grad = torch.tensor([1.0, 2.0])
    assert s.has_overflow([p]) is False


def test_dynamic_scaler_halves_on_overflow_never_below_one():
    s = DynamicLossScaler(init_scale=4.0, scale_window=3)
    s.update_scale(True)
    assert s.loss_scale == 2.0
    s.update_scale(True)
    assert s.loss_scale == 1.0
    s.update_scale(True)
    assert s.loss_scale == 1.0
    s = DynamicLossScaler(init_scale=3.0, scale_window=3)
    s.update_scale(True)
    assert s.loss_scale == 1.5
    s.update_scale(True)
    assert s.loss_scale == 1.0


def test_dynamic_scaler_doubles_after_window_and_overflow_resets_count():
    s = DynamicLossScaler(init_scale=16.0, scale_window=3)
    history = []
    for overflow in [False, False, False,          # 3 clean -> 32
                     False, False, True,           # overflow after 2 clean -> 16, count reset
                     False, False,                 # only 2 clean: stays 16
                     False,                        # 3rd clean since overflow -> 32
                     False, False, False]:         # -> 64
        s.update_scale(overflow)
        history.append(s.loss_scale)
    assert history == [16, 16, 32, 32, 32, 16, 16, 16, 32, 32, 32, 64]


def test_dynamic_scaler_defaults_and_apex_attributes():
    """apex 2018's DynamicLossScaler: first scale 2**32, its counters as attributes (no state_dict)."""
    s = DynamicLossScaler()
    assert s.loss_scale == s.cur_scale == 2.0 ** 32
    assert (s.cur_iter, s.last_overflow_iter, s.scale_factor, s.scale_window) == (0, -1, 2.0, 1000)
    assert not hasattr(s, 'state_dict') and not hasattr(s, 'load_state_dict')
    s = DynamicLossScaler(init_scale=8, scale_factor=3, scale_window=2)
    history = []
    for overflow in (False, False, True, False, False):
        s.update_scale(overflow)
        history.append((s.cur_scale, s.cur_iter, s.last_overflow_iter))
    # iteration 1: (1 - -1) % 2 == 0 -> x3; iteration 2 overflows; iteration 4: (4 - 2) % 2 == 0 -> x3
    assert history == [(8, 1, -1), (24, 2, -1), (8, 3, 2), (8, 4, 2), (24, 5, 2)]


def test_dynamic_scaler_has_overflow_and_backward():
    s = DynamicLossScaler(init_scale=4.0)
    p = nn.Parameter(torch.zeros(3, dtype=torch.float16))
    p.grad = torch.tensor([1.0, float('nan'), 0.0], dtype=torch.float16)
    assert s.has_overflow([p]) is True
    p.grad = torch.ones(3, dtype=torch.float16)
    assert s.has_overflow([p]) is False
    w = torch.tensor([3.0], requires_grad=True)
    s.backward(w * 2)
    assert torch.equal(w.grad, torch.tensor([8.0]))


# ---------------------------------------------------------------- FP16_Optimizer

def make_opt(model, **kw):
    momentum = kw.pop('momentum', 0.0)
    lr = kw.pop('lr', 0.1)
    return FP16_Optimizer(torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum), verbose=False, **kw)


def train_step(model, opt, x, y, clip=None):
    opt.zero_grad()
    loss = mlp_loss(model, x, y)
    opt.backward(loss)
    if clip is not None:
        opt.clip_master_grads(clip)
    opt.step()
    return loss


def test_masters_are_fp32_copies_held_by_wrapped_optimizer():
    model = half_mlp()
    opt = make_opt(model, static_loss_scale=64.0)
    params = list(model.parameters())
    masters = opt.fp32_from_fp16_groups[0]
    group_params = opt.param_groups[0]['params']
    assert opt.param_groups is opt.optimizer.param_groups
    assert len(group_params) == len(params) == len(masters)
    for gp, m, p in zip(group_params, masters, params):
        assert gp is m
        assert all(gp is not q for q in params)
        assert m.dtype == torch.float32
        assert torch.equal(m, p.float())
    assert opt.fp16_groups[0] == params
    for x, y in batches(3):
        before = [m.detach().clone() for m in masters]
        train_step(model, opt, x, y)
        assert not opt.overflow
        assert any(not torch.equal(b, m) for b, m in zip(before, masters))
        for m, p in zip(masters, model.parameters()):
            assert torch.equal(p, m.detach().half())


def test_static_scaling_matches_fp32_sgd():
    model = half_mlp()
    ref = copy.deepcopy(model).float()
    lr, scale = 0.5, 128.0
    opt = make_opt(model, static_loss_scale=scale, lr=lr)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=lr)
    (x, y), = batches(1)
    train_step(model, opt, x, y)
    assert not opt.overflow
    ref_opt.zero_grad()
    mlp_loss(ref, x, y).backward()
    ref_grads = [p.grad.clone() for p in ref.parameters()]
    ref_opt.step()
    for m, g in zip(opt.fp32_from_fp16_groups[0], ref_grads):
        torch.testing.assert_close(m.grad, g, rtol=2e-2, atol=2e-3)
    for m, r, p in zip(opt.fp32_from_fp16_groups[0], ref.parameters(), model.parameters()):
        torch.testing.assert_close(m.detach(), r.detach(), rtol=1e-3, atol=2e-3)
        torch.testing.assert_close(p.float(), r.detach(), rtol=2e-3, atol=2e-3)


def test_loss_scale_multiplies_model_grads():
    model = half_mlp()
    twin = copy.deepcopy(model)
    (x, y), = batches(1)
    opt = make_opt(model, static_loss_scale=256.0)
    opt.backward(mlp_loss(model, x, y))
    opt1 = make_opt(twin, static_loss_scale=1.0)
    opt1.backward(mlp_loss(twin, x, y))
    w, w1 = model[2].weight, twin[2].weight
    ratio = w.grad.float() / w1.grad.float()
    mask = w1.grad.float().abs() > 1e-3
    torch.testing.assert_close(ratio[mask], torch.full_like(ratio[mask], 256.0), rtol=2e-2, atol=0)
    # the master grads are unscaled
    torch.testing.assert_close(opt.fp32_from_fp16_groups[0][2].grad, w.grad.float() / 256.0, rtol=0, atol=0)


@pytest.mark.parametrize('dynamic', [False, True])
def test_forced_overflow_skips_step(dynamic):
    model = half_mlp()
    kw = dict(dynamic_loss_scale=True, dynamic_loss_args=dict(init_scale=2.0 ** 10)) if dynamic \
        else dict(static_loss_scale=32.0)
    opt = make_opt(model, momentum=0.9, **kw)
    (x, y), = batches(1)
    weights = [p.detach().clone() for p in model.parameters()]
    masters = [m.detach().clone() for m in opt.fp32_from_fp16_groups[0]]
    opt.zero_grad()
    opt.backward(mlp_loss(model, x, y), update_master_grads=False)
    model[0].weight.grad[0, 0] = INF
    opt.update_master_grads()
    assert opt.overflow is True
    assert opt.clip_master_grads(1.0) == -1
    opt.step()
    for w, p in zip(weights, model.parameters()):
        assert torch.equal(w, p)
    for m0, m in zip(masters, opt.fp32_from_fp16_groups[0]):
        assert torch.equal(m0, m)
    assert opt.optimizer.state_dict()['state'] == {}  # the wrapped optimizer never stepped
    assert opt.loss_scale == (2.0 ** 9 if dynamic else 32.0)
    # the next clean step goes through
    train_step(model, opt, x, y)
    assert not opt.overflow
    assert any(not torch.equal(w, p) for w, p in zip(weights, model.parameters()))


def test_dynamic_scale_defaults_are_apex_last():
    model = half_mlp()
    assert make_opt(model, dynamic_loss_scale=True).loss_scale == 2.0 ** 16
    # the first scale is capped at max_loss_scale (2**24 by default)
    assert make_opt(half_mlp(), dynamic_loss_scale=True, dynamic_loss_args=dict(init_scale=2.0 ** 32)).loss_scale \
        == 2.0 ** 24
    assert make_opt(half_mlp(), static_loss_scale=2.0 ** 32).loss_scale == 2.0 ** 32  # a static scale is not capped
    with pytest.raises(TypeError):
        make_opt(half_mlp(), dynamic_loss_scale=True, dynamic_loss_args=dict(delayed_shift=2))


def test_natural_overflow_with_huge_dynamic_scale():
    model = half_mlp()
    huge = dict(init_scale=2.0 ** 32, max_loss_scale=2.0 ** 32)  # overflows fp16 grads
    opt = make_opt(model, dynamic_loss_scale=True, dynamic_loss_args=huge)
    (x, y), = batches(1)
    weights = [p.detach().clone() for p in model.parameters()]
    train_step(model, opt, x, y)
    assert opt.overflow
    assert opt.loss_scale == 2.0 ** 31
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))


def test_verbose_overflow_message(capsys):
    model = half_mlp()
    opt = FP16_Optimizer(torch.optim.SGD(model.parameters(), lr=0.1), dynamic_loss_scale=True,
                         dynamic_loss_args=dict(init_scale=64.0))
    out = capsys.readouterr().out
    assert out.splitlines()[0] == 'FP16_Optimizer processing param group 0:'
    assert out.count('FP16_Optimizer received torch.HalfTensor with torch.Size(') == 4
    (x, y), = batches(1)
    opt.backward(mlp_loss(model, x, y), update_master_grads=False)
    model[2].bias.grad[0] = float('nan')
    opt.update_master_grads()
    assert capsys.readouterr().out == ''  # the message comes from step(), which skips
    opt.step()
    assert 'Gradient overflow.  Skipping step, reducing loss scale to 32' in capsys.readouterr().out
    assert opt.loss_scale == 32.0


def test_quiet_with_verbose_false(capsys):
    model = half_mlp()
    opt = make_opt(model, dynamic_loss_scale=True, dynamic_loss_args=dict(init_scale=64.0))
    (x, y), = batches(1)
    opt.backward(mlp_loss(model, x, y), update_master_grads=False)
    model[2].bias.grad[0] = float('nan')
    opt.update_master_grads()
    opt.step()
    assert opt.overflow and capsys.readouterr().out == ''


@pytest.mark.parametrize('max_norm', [1e-3, 1e6])
def test_clip_master_grads_matches_clip_grad_norm(max_norm):
    model = half_mlp()
    scale = 64.0
    opt = make_opt(model, static_loss_scale=scale)
    (x, y), = batches(1)
    opt.backward(mlp_loss(model, x, y))
    copies = []
    for p in model.parameters():
        c = p.detach().float().clone().requires_grad_()
        c.grad = p.grad.float() / scale
        copies.append(c)
    expected_norm = torch.nn.utils.clip_grad_norm_(copies, max_norm)
    norm = opt.clip_master_grads(max_norm)
    torch.testing.assert_close(torch.as_tensor(norm, dtype=torch.float32), expected_norm)
    for m, c in zip(opt.fp32_from_fp16_groups[0], copies):
        torch.testing.assert_close(m.grad, c.grad)
    total = torch.cat([m.grad.reshape(-1) for m in opt.fp32_from_fp16_groups[0]]).norm()
    if max_norm < expected_norm:
        torch.testing.assert_close(total, torch.tensor(max_norm), rtol=1e-4, atol=0)


def _train(model, opt, data, overflow_at=()):
    for k, (x, y) in enumerate(data):
        opt.zero_grad()
        opt.backward(mlp_loss(model, x, y), update_master_grads=False)
        if k in overflow_at:
            next(model.parameters()).grad[0, 0] = INF
        opt.update_master_grads()
        opt.clip_master_grads(5.0)
        opt.step()


def test_state_dict_round_trip_is_bit_identical(tmp_path):
    data = batches(6)
    dyn = dict(dynamic_loss_scale=True, dynamic_loss_args=dict(init_scale=2.0 ** 6, scale_window=2))
    model = half_mlp(seed=0)
    opt = make_opt(model, momentum=0.9, lr=0.05, **dyn)
    _train(model, opt, data[:3], overflow_at=(1,))
    path = tmp_path / 'opt.pt'
    torch.save({'model': model.state_dict(), 'opt': opt.state_dict()}, path)
    saved = torch.load(path, weights_only=True)
    scale_at_save = opt.loss_scale
    assert (scale_at_save, opt.loss_scaler.clean_steps) == (2.0 ** 5, 1)  # the state to restore is not the initial one
    _train(model, opt, data[3:])

    other = half_mlp(seed=1)  # different initial weights: everything must come from the saved state
    assert any(not torch.equal(a, b) for a, b in zip(other.parameters(), model.parameters()))
    other_opt = make_opt(other, momentum=0.9, lr=0.05, **dyn)
    other_opt.load_state_dict(saved['opt'])
    assert other_opt.loss_scale == scale_at_save
    _train(other, other_opt, data[3:])

    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(opt.fp32_from_fp16_groups[0], other_opt.fp32_from_fp16_groups[0]):
        assert torch.equal(a, b)
    assert opt.loss_scale == other_opt.loss_scale
    assert opt.loss_scaler.clean_steps == other_opt.loss_scaler.clean_steps


def test_state_dict_round_trip_without_momentum_state_differs(tmp_path):
    """Control for the test above: dropping the optimizer state changes the result."""
    data = batches(6)
    model = half_mlp(seed=0)
    opt = make_opt(model, momentum=0.9, lr=0.05, static_loss_scale=64.0)
    _train(model, opt, data[:3])
    state = copy.deepcopy(opt.state_dict())
    state['optimizer_state_dict']['state'] = {}
    _train(model, opt, data[3:])
    other = half_mlp(seed=1)
    other_opt = make_opt(other, momentum=0.9, lr=0.05, static_loss_scale=64.0)
    other_opt.load_state_dict(state)
    _train(other, other_opt, data[3:])
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))


def test_load_state_dict_adopts_the_saved_scaler_kind():
    """As apex did: the loaded optimizer scales the way the saved one did."""
    static_model, dynamic_model = half_mlp(), half_mlp()
    static = make_opt(static_model, static_loss_scale=8.0)
    dynamic = make_opt(dynamic_model, dynamic_loss_scale=True)
    static_state, dynamic_state = static.state_dict(), dynamic.state_dict()
    static.load_state_dict(dynamic_state)
    assert static.dynamic_loss_scale is True and static.loss_scale == 2.0 ** 16
    dynamic.load_state_dict(static_state)
    assert dynamic.dynamic_loss_scale is False and dynamic.loss_scale == 8.0
    # and each acts on it: an overflow halves the adopted dynamic scale, leaves the adopted static one
    data = batches(1)
    _train(static_model, static, data, overflow_at=(0,))
    assert static.overflow and static.loss_scale == 2.0 ** 15
    _train(dynamic_model, dynamic, data, overflow_at=(0,))
    assert dynamic.overflow and dynamic.loss_scale == 8.0


def test_load_state_dict_rejects_other_shapes():
    opt = make_opt(half_mlp(), static_loss_scale=8.0)
    torch.manual_seed(0)
    other = make_opt(nn.Sequential(nn.Linear(8, 15), nn.Tanh(), nn.Linear(15, 4)).half(), static_loss_scale=8.0)
    with pytest.raises(ValueError, match='other shapes'):
        other.load_state_dict(opt.state_dict())


def test_rnn_model_with_fp16_optimizer_state_round_trip(tmp_path):
    """The same with the project's RNNModel (tied weights, LSTM)."""
    def make(seed):
        torch.manual_seed(seed)
        return RNNModel('LSTM', 32, 16, 16, 1, dropout=0.0, tie_weights=True).half()

    g = torch.Generator().manual_seed(5)
    data = [(torch.randint(32, (5, 4), generator=g), torch.randint(32, (20,), generator=g)) for _ in range(6)]

    def run(model, opt, chunk):
        for inp, target in chunk:
            opt.zero_grad()
            out, _ = model(inp, model.init_hidden(4))
            opt.backward(F.cross_entropy(out.view(-1, 32).float(), target))
            opt.clip_master_grads(0.25)
            opt.step()

    dyn = dict(dynamic_loss_scale=True, dynamic_loss_args=dict(init_scale=2.0 ** 8, scale_window=2))
    model = make(0)
    opt = make_opt(model, momentum=0.9, lr=1.0, **dyn)
    run(model, opt, data[:3])
    torch.save(opt.state_dict(), tmp_path / 's.pt')
    run(model, opt, data[3:])
    other = make(1)
    other_opt = make_opt(other, momentum=0.9, lr=1.0, **dyn)
    other_opt.load_state_dict(torch.load(tmp_path / 's.pt', weights_only=True))
    run(other, other_opt, data[3:])
    assert other.decoder.weight is other.encoder.weight
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


def test_flat_master_matches_per_param_masters():
    lr, scale = 0.2, 128.0
    model_a, model_b = half_mlp(), half_mlp()
    params_a, masters_a = prep_param_lists(model_a)
    params_b, masters_b = prep_param_lists(model_b, flat_master=True)
    opt_a = torch.optim.SGD(masters_a, lr=lr, momentum=0.5)
    opt_b = torch.optim.SGD(masters_b, lr=lr, momentum=0.5)
    for x, y in batches(4):
        for model, params, masters, opt, flat in ((model_a, params_a, masters_a, opt_a, False),
                                                  (model_b, params_b, masters_b, opt_b, True)):
            for p in params:
                p.grad = None
            (mlp_loss(model, x, y) * scale).backward()
            assert not grads_to_masters_unscaled(params, masters, scale, flat=flat)
            opt.step()
            master_params_to_model_params(params, masters, flat_master=flat)
    flat = torch.cat([m.detach().reshape(-1) for m in masters_a])
    torch.testing.assert_close(masters_b[0].detach(), flat)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    # and the weights did move
    assert not torch.equal(model_a[0].weight, half_mlp()[0].weight)


def test_fp32_params_are_not_copied():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16).half(), nn.Linear(16, 4).half())
    extra = nn.Parameter(torch.ones(4))  # an fp32 param in the optimizer
    frozen = model[0].bias
    frozen.requires_grad_(False)
    sgd = torch.optim.SGD([{'params': list(model.parameters())}, {'params': [extra]}], lr=0.5)
    opt = FP16_Optimizer(sgd, static_loss_scale=16.0, verbose=False)
    assert opt.param_groups[1]['params'][0] is extra
    assert opt.fp32_from_fp32_groups == [[], [extra]]
    assert any(p is frozen for p in opt.param_groups[0]['params'])  # frozen params stay as they are
    assert len(opt.fp32_from_fp16_groups[0]) == 3
    (x, y), = batches(1)
    # the true gradient of extra, unscaled, in fp32
    ref_extra = nn.Parameter(torch.ones(4))
    F.mse_loss(model(x.half()).float().detach() * ref_extra, y).backward()
    opt.zero_grad()
    out = model(x.half()).float() * extra
    opt.backward(F.mse_loss(out, y))
    grad = extra.grad.clone()  # unscaled by update_master_grads
    torch.testing.assert_close(grad, ref_extra.grad)
    before = extra.detach().clone()
    frozen_before = frozen.detach().clone()
    opt.step()
    torch.testing.assert_close(extra.detach(), before - 0.5 * grad)
    assert extra.dtype == torch.float32
    assert torch.equal(frozen, frozen_before)


def test_fp16_optimizer_rejects_other_dtypes():
    p = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(TypeError):
        FP16_Optimizer(torch.optim.SGD([p], lr=0.1))


def test_existing_optimizer_state_moves_to_masters():
    model = half_mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    fill_grads(list(model.parameters()))
    sgd.step()  # creates fp16 momentum buffers keyed by the fp16 params
    buffers = [sgd.state[p]['momentum_buffer'].clone() for p in model.parameters()]
    assert all(b.dtype == torch.float16 for b in buffers)
    opt = FP16_Optimizer(sgd, verbose=False)
    for m, b in zip(opt.fp32_from_fp16_groups[0], buffers):
        buf = opt.optimizer.state[m]['momentum_buffer']
        assert buf.dtype == torch.float32
        assert torch.equal(buf, b.float())
    assert all(p not in opt.optimizer.state for p in model.parameters())
