"""fp16_utils as a drop-in for apex.fp16_utils, written the way apex users wrote their code."""
import inspect
import math
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fp16_utils
from model import RNNModel

APEX_NAMES = ['BN_convert_float', 'network_to_half', 'prep_param_lists', 'model_grads_to_master_grads',
              'master_params_to_model_params', 'tofp16', 'to_python_float', 'clip_grad_norm', 'convert_module',
              'convert_network', 'FP16Model', 'FP16_Optimizer', 'LossScaler', 'DynamicLossScaler']

# What apex users wrote at the top of their scripts, run once into this module's own namespace
# (kept apart from the test for the namespace itself, which runs it into an empty dict).
apex = {}
exec('from fp16_utils import *', apex)
FP16_Optimizer = apex['FP16_Optimizer']
prep_param_lists = apex['prep_param_lists']
model_grads_to_master_grads = apex['model_grads_to_master_grads']
master_params_to_model_params = apex['master_params_to_model_params']
clip_grad_norm = apex['clip_grad_norm']
to_python_float = apex['to_python_float']

INF = float('inf')
NTOKEN, BSZ, BPTT = 20, 4, 6


# ---------------------------------------------------------------- data and models

def lm_batches(n=8, seed=0):
    """(data, targets) pairs from a stream where each token mostly has one fixed successor:
    an LSTM learns it within a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    successor = torch.randperm(NTOKEN, generator=g)
    length = n * BPTT + 1
    streams = []
    for _ in range(BSZ):
        token = int(torch.randint(NTOKEN, (1,), generator=g))
        stream = []
        for _ in range(length):
            stream.append(token)
            token = int(successor[token]) if torch.rand(1, generator=g).item() < 0.9 \
                else int(torch.randint(NTOKEN, (1,), generator=g))
        streams.append(stream)
    source = torch.tensor(streams).t().contiguous()  # [length, BSZ], as batchify lays it out
    return [(source[i:i + BPTT], source[i + 1:i + 1 + BPTT].reshape(-1)) for i in range(0, n * BPTT, BPTT)]


def tiny_lm(seed=0, rnn_type='LSTM'):
    torch.manual_seed(seed)
    return RNNModel(rnn_type, NTOKEN, 16, 16, 1, dropout=0.0)


criterion = nn.CrossEntropyLoss()


def lm_loss(model, data, targets):
    output, _ = model(data, model.init_hidden(BSZ))
    return criterion(output.view(-1, NTOKEN), targets)  # in fp16, as the example computed it


def mlp_data(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 6, generator=g)
    return x, torch.sin(x[:, :2] * 1.5) + 0.5 * x[:, 2:4]


def tiny_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))


def mlp_loss(model, x, y):
    return F.mse_loss(model(x.half()).float(), y)


def model_follows_masters(model, optimizer):
    """The fp16 model holds the fp32 masters rounded to fp16."""
    masters = [p for g in optimizer.fp32_from_fp16_groups for p in g]
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(masters) == len(params) > 0
    return all(p.dtype == torch.float16 and torch.equal(p, m.detach().half()) for p, m in zip(params, masters))


def snapshot(tensors):
    return [t.detach().clone() for t in tensors]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------- the names

def test_star_import_gives_exactly_apex_names():
    namespace = {}
    exec('from fp16_utils import *', namespace)
    del namespace['__builtins__']
    assert sorted(namespace) == sorted(APEX_NAMES)
    assert sorted(fp16_utils.__all__) == sorted(APEX_NAMES) and len(fp16_utils.__all__) == 14
    for name in ('torch', 'nn', 'math', 'grad_norm', 'OptimizerLossScale'):
        assert name not in namespace
    assert all(callable(namespace[name]) for name in APEX_NAMES)
    assert namespace['clip_grad_norm'] is torch.nn.utils.clip_grad_norm_
    from fp16_utils import grad_norm  # still importable by name
    assert callable(grad_norm)


def parameters(func):
    """(name, default) of each named parameter; *args and **kwargs left out."""
    return [(p.name, p.default) for p in inspect.signature(func).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


E = inspect.Parameter.empty

# apex's documented signatures: (name, default) in order; ours may add parameters after them, with defaults.
APEX_SIGNATURES = {
    'prep_param_lists': [('model', E), ('flat_master', False)],
    'model_grads_to_master_grads': [('model_params', E), ('master_params', E), ('flat_master', False)],
    'master_params_to_model_params': [('model_params', E), ('master_params', E), ('flat_master', False)],
    'BN_convert_float': [('module', E)],
    'network_to_half': [('network', E)],
    'convert_module': [('module', E), ('dtype', E)],
    'convert_network': [('network', E), ('dtype', E)],
    'to_python_float': [('t', E)],
    'FP16Model': [('network', E)],
    'tofp16': [],
    'LossScaler': [('scale', 1)],
    'DynamicLossScaler': [('init_scale', 2 ** 32), ('scale_factor', 2.), ('scale_window', 1000)],
    'FP16_Optimizer': [('init_optimizer', E), ('static_loss_scale', 1.0), ('dynamic_loss_scale', False),
                       ('dynamic_loss_args', None), ('verbose', True)],
    'FP16_Optimizer.backward': [('loss', E), ('update_master_grads', True), ('retain_graph', False)],
    'FP16_Optimizer.step': [('closure', None)],
    'FP16_Optimizer.zero_grad': [('set_grads_to_None', False)],
    'FP16_Optimizer.clip_master_grads': [('max_norm', E), ('norm_type', 2)],
    'FP16_Optimizer.update_master_grads': [],
    'FP16_Optimizer.inspect_master_grad_data': [],
    'FP16_Optimizer.state_dict': [],
    'FP16_Optimizer.load_state_dict': [('state_dict', E)],
    'LossScaler.has_overflow': [('params', E)],
    'LossScaler.update_scale': [('overflow', E)],
    'LossScaler.scale_gradient': [('module', E), ('grad_in', E), ('grad_out', E)],
    'LossScaler.backward': [('loss', E), ('retain_graph', False)],
    'DynamicLossScaler.has_overflow': [('params', E)],
    'DynamicLossScaler.update_scale': [('overflow', E)],
    'DynamicLossScaler.backward': [('loss', E), ('retain_graph', False)],
}


@pytest.mark.parametrize('name', list(APEX_SIGNATURES))
def test_signature_as_apex_documents_it(name):
    obj = apex[name.split('.')[0]]
    if '.' in name:
        obj = getattr(obj, name.split('.')[1])
    got = parameters(obj)
    if got and got[0][0] == 'self':
        got = got[1:]
    expected = APEX_SIGNATURES[name]
    assert got[:len(expected)] == expected, got
    assert all(default is not E for _, default in got[len(expected):]), got  # additions are optional


def test_constructors_accept_what_apex_users_passed():
    model = tiny_mlp().half()
    all_five = dict(init_scale=2 ** 12, scale_factor=2., scale_window=500, min_loss_scale=1, max_loss_scale=2 ** 20)
    opt = FP16_Optimizer(torch.optim.SGD(model.parameters(), lr=0.1), dynamic_loss_scale=True,
                         dynamic_loss_args=all_five, verbose=False)
    assert opt.loss_scale == 2 ** 12 and opt.dynamic_loss_scale is True
    opt = FP16_Optimizer(torch.optim.SGD(model.parameters(), lr=0.1), dynamic_loss_scale=True,
                         dynamic_loss_args={'max_loss_scale': 2 ** 10}, verbose=False)
    assert opt.loss_scale == 2 ** 10  # the first scale is min(init_scale 2**16, max_loss_scale)
    with pytest.raises(TypeError):
        FP16_Optimizer(torch.optim.SGD(model.parameters(), lr=0.1), dynamic_loss_scale=True,
                       dynamic_loss_args={'scale_windows': 10}, verbose=False)
    opt = FP16_Optimizer(torch.optim.SGD(model.parameters(), lr=0.1), static_loss_scale=128.0, verbose=False)
    assert (opt.loss_scale, opt.dynamic_loss_scale) == (128.0, False)
    assert FP16_Optimizer(torch.optim.SGD(model.parameters(), lr=0.1), verbose=False).loss_scale == 1.0
    assert apex['LossScaler']().loss_scale == 1 and apex['LossScaler'](scale=128).cur_scale == 128
    d = apex['DynamicLossScaler'](init_scale=2 ** 10, scale_factor=4., scale_window=3)
    assert (d.cur_scale, d.scale_factor, d.scale_window, d.cur_iter, d.last_overflow_iter) == (2 ** 10, 4., 3, 0, -1)


def test_fp16_optimizer_attributes_and_state_dict_keys():
    model = tiny_mlp().half()
    extra = nn.Parameter(torch.zeros(2))  # an fp32 param
    sgd = torch.optim.SGD([{'params': model.parameters()}, {'params': [extra]}], lr=0.1)
    opt = FP16_Optimizer(sgd, static_loss_scale=8.0, verbose=False)
    params = list(model.parameters())
    assert opt.fp16_groups == [params, []] and opt.all_fp16_params == params
    assert len(opt.fp32_from_fp16_groups[0]) == 4 and opt.fp32_from_fp16_groups[1] == []
    assert opt.all_fp32_from_fp16_params == opt.fp32_from_fp16_groups[0]
    assert opt.fp32_from_fp32_groups == [[], [extra]] and opt.all_fp32_from_fp32_params == [extra]
    assert opt.loss_scaler is not None and opt.overflow is False and opt.first_closure_call_this_step is True
    assert opt.clip_grad_norm is clip_grad_norm
    assert opt.param_groups is sgd.param_groups and opt.state is sgd.state
    assert sorted(opt.state_dict()) == sorted(['loss_scaler', 'dynamic_loss_scale', 'overflow',
                                               'first_closure_call_this_step', 'optimizer_state_dict',
                                               'fp32_from_fp16'])
    opt.loss_scale = 32.0  # settable, as in apex
    assert opt.loss_scale == 32.0
    new_state = {}
    opt.state = new_state
    assert sgd.state is new_state
    with pytest.raises(RuntimeError, match='state_dict'):
        pickle.dumps(opt)


def test_zero_grad_and_inspect_master_grad_data(capsys):
    model = tiny_mlp().half()
    model[0].bias.requires_grad_(False)  # stays in the group, never gets a grad
    opt = FP16_Optimizer(torch.optim.SGD(model.parameters(), lr=0.1), static_loss_scale=64.0, verbose=False)
    x, y = mlp_data()
    opt.backward(mlp_loss(model, x, y))
    data = opt.inspect_master_grad_data()
    group = opt.param_groups[0]['params']
    assert len(data) == 1 and len(data[0]) == len(group) == 4
    for param, grad in zip(group, data[0]):
        if param is model[0].bias:
            assert grad is None
        else:
            assert grad.dtype == torch.float32 and torch.equal(grad, param.grad)
    # the master grads are the fp16 grads divided by the scale
    w = model[2].weight
    assert torch.equal(data[0][2], w.grad.float() / 64.0)
    opt.zero_grad()
    assert all(p.grad is None or not p.grad.any() for p in group + list(model.parameters()))
    assert w.grad is not None and opt.fp32_from_fp16_groups[0][2].grad is not None
    opt.zero_grad(set_grads_to_None=True)
    assert all(p.grad is None for p in group + list(model.parameters()))
    # after an overflow: None, and a warning
    opt.backward(mlp_loss(model, x, y) * INF)
    assert opt.overflow
    capsys.readouterr()
    assert opt.inspect_master_grad_data() is None
    assert 'inspect_master_grad_data while in an overflow state' in capsys.readouterr().out


def test_verbose_messages(capsys):
    model = tiny_mlp().half()
    opt = FP16_Optimizer(torch.optim.SGD(model.parameters(), lr=0.1), dynamic_loss_scale=True,
                         dynamic_loss_args={'init_scale': 256.0})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == 'FP16_Optimizer processing param group 0:'
    assert lines[1:] == [f'FP16_Optimizer received torch.HalfTensor with {p.size()}' for p in model.parameters()]
    x, y = mlp_data()
    opt.backward(mlp_loss(model, x, y) * INF)
    opt.step()
    assert capsys.readouterr().out.startswith('Gradient overflow.  Skipping step, reducing loss scale to 128')
    FP16_Optimizer(torch.optim.SGD(model.parameters(), lr=0.1), verbose=False)
    assert capsys.readouterr().out == ''


# ---------------------------------------------------------------- the example's training loops

def test_manual_recipe_as_the_example_wrote_it():
    """apex's word_language_model --fp16: half model, fp32 masters, every step by hand."""
    model = tiny_lm()
    model.half()
    model_params, master_params = prep_param_lists(model)
    static_loss_scale, lr, clip = 128.0, 5.0, 0.25
    batches = lm_batches()
    losses = []
    for epoch in range(6):
        total_loss = 0
        for data, targets in batches:
            model.zero_grad()
            output, hidden = model(data, model.init_hidden(BSZ))
            loss = criterion(output.view(-1, NTOKEN), targets)
            loss = loss * static_loss_scale
            loss.backward()
            loss = loss / static_loss_scale
            model_grads_to_master_grads(model_params, master_params)
            for param in master_params:
                param.grad.data.mul_(1. / static_loss_scale)
            clip_grad_norm(master_params, clip)
            for param in master_params:
                param.data = param.data - param.grad.data * lr
            master_params_to_model_params(model_params, master_params)
            assert all(torch.equal(p, m.half()) for p, m in zip(model_params, master_params))
            total_loss += loss.data
        losses.append(to_python_float(total_loss) / len(batches))
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(p.dtype == torch.float16 for p in model.parameters())
    assert all(m.dtype == torch.float32 for m in master_params)


def fp16_optimizer_epochs(model, optimizer, batches, epochs, clip=0.25):
    """The FP16_Optimizer loop of apex's example; mean loss per epoch, and the number of skipped steps."""
    losses, skipped = [], 0
    for epoch in range(epochs):
        total_loss = 0
        for data, targets in batches:
            optimizer.zero_grad()
            output, hidden = model(data, model.init_hidden(BSZ))
            loss = criterion(output.view(-1, NTOKEN), targets)
            optimizer.backward(loss)
            optimizer.clip_master_grads(clip)
            optimizer.step()
            skipped += optimizer.overflow
            assert model_follows_masters(model, optimizer)
            total_loss += loss.data
        losses.append(to_python_float(total_loss) / len(batches))
    return losses, skipped


def test_fp16_optimizer_static_loop_matches_the_manual_recipe():
    batches = lm_batches()
    model = tiny_lm().half()
    optimizer = FP16_Optimizer(torch.optim.SGD(model.parameters(), lr=5.0), static_loss_scale=128, verbose=False)
    losses, skipped = fp16_optimizer_epochs(model, optimizer, batches, 6)
    assert losses[-1] < losses[0] - 0.5, losses
    assert optimizer.loss_scale == 128 and skipped == 0
    # the manual recipe, over the same batches from the same weights, lands on the same masters
    manual = tiny_lm().half()
    model_params, master_params = prep_param_lists(manual)
    for epoch in range(6):
        for data, targets in batches:
            manual.zero_grad()
            (lm_loss(manual, data, targets) * 128.0).backward()
            model_grads_to_master_grads(model_params, master_params)
            for param in master_params:
                param.grad.data.mul_(1. / 128.0)
            clip_grad_norm(master_params, 0.25)
            for param in master_params:
                param.data = param.data - param.grad.data * 5.0
            master_params_to_model_params(model_params, master_params)
    for m, ours in zip(master_params, optimizer.fp32_from_fp16_groups[0]):
        # close, not equal: SGD rounds its update its own way, and fp16 rounding of the model amplifies that
        torch.testing.assert_close(ours.detach(), m.detach(), rtol=1e-3, atol=1e-3)


def test_fp16_optimizer_dynamic_loop():
    model = tiny_lm().half()
    optimizer = FP16_Optimizer(torch.optim.SGD(model.parameters(), lr=5.0), dynamic_loss_scale=True, verbose=False)
    assert optimizer.loss_scale == 2 ** 16
    losses, skipped = fp16_optimizer_epochs(model, optimizer, lm_batches(), 6)
    assert losses[-1] < losses[0] - 0.5, losses
    # 2**16 overflows this model's fp16 gradients at first (the decoder bias sums 24 of them); each
    # overflow skips a step and halves the scale, and it grows back only after 2000 clean steps
    assert 1 <= skipped <= 3 and optimizer.loss_scale == 2 ** (16 - skipped)


def lm_closure(model, optimizer, data, targets, calls):
    def closure():
        assert model_follows_masters(model, optimizer)  # each evaluation sees the current masters
        calls.append(1)
        assert len(calls) < 100, 'the closure keeps being evaluated'  # a failure, not a hang
        optimizer.zero_grad()
        output, hidden = model(data, model.init_hidden(BSZ))
        loss = criterion(output.view(-1, NTOKEN), targets)
        optimizer.backward(loss)
        return loss
    return closure


@pytest.mark.parametrize('dynamic', [False, True])
def test_closure_steps_with_sgd(dynamic):
    model = tiny_lm().half()
    kw = dict(dynamic_loss_scale=True) if dynamic else dict(static_loss_scale=128.0)
    optimizer = FP16_Optimizer(torch.optim.SGD(model.parameters(), lr=5.0), verbose=False, **kw)
    losses, calls = [], []
    for epoch in range(6):
        total = 0.0
        for data, targets in lm_batches():
            before, scale = len(calls), optimizer.loss_scale
            loss = optimizer.step(lm_closure(model, optimizer, data, targets, calls))
            # SGD evaluates the closure once, and again after each overflow, at half the scale
            overflows = round(math.log2(scale / optimizer.loss_scale))
            assert len(calls) == before + 1 + overflows
            assert not optimizer.overflow and model_follows_masters(model, optimizer)
            assert optimizer.first_closure_call_this_step is True
            total += to_python_float(loss)
        losses.append(total / len(lm_batches()))
    assert losses[-1] < losses[0] - 0.5, losses
    assert optimizer.loss_scale == (128.0 if not dynamic else 2 ** 15)  # one overflow at first, see above


@pytest.mark.parametrize('dynamic', [False, True])
def test_closure_steps_with_lbfgs(dynamic):
    """LBFGS evaluates the closure many times per step; before each re-evaluation the fp16 model
    holds the masters the optimizer has just moved."""
    model = tiny_mlp().half()
    x, y = mlp_data()
    kw = dict(dynamic_loss_scale=True) if dynamic else dict(static_loss_scale=256.0)
    optimizer = FP16_Optimizer(torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5), verbose=False, **kw)
    calls, losses = [], []

    def closure():
        assert model_follows_masters(model, optimizer)
        calls.append(1)
        assert len(calls) < 100, 'the closure keeps being evaluated'
        optimizer.zero_grad()
        loss = F.mse_loss(model(x.half()).float(), y)
        optimizer.backward(loss)
        return loss

    for _ in range(5):
        before = len(calls)
        losses.append(to_python_float(optimizer.step(closure)))
        assert len(calls) > before + 1
        assert model_follows_masters(model, optimizer)
    final = to_python_float(mlp_loss(model, x, y))
    assert final < losses[0] * 0.5, (losses, final)
    assert optimizer.loss_scale == (2 ** 16 if dynamic else 256.0)


def train_lm(model, optimizer, batches):
    for data, targets in batches:
        optimizer.zero_grad()
        optimizer.backward(lm_loss(model, data, targets))
        optimizer.clip_master_grads(0.25)
        optimizer.step()


def test_checkpoint_round_trip_continues_bit_identically(tmp_path):
    """torch.save({'model':..., 'optimizer': optimizer.state_dict()}), then torch.load(weights_only=True)
    into a fresh model and FP16_Optimizer: training goes on exactly as if never interrupted."""
    batches = lm_batches(6)
    args = dict(dynamic_loss_scale=True, dynamic_loss_args={'init_scale': 2 ** 10, 'scale_window': 3})

    def make(seed):
        model = tiny_lm(seed).half()
        return model, FP16_Optimizer(torch.optim.SGD(model.parameters(), lr=2.0, momentum=0.9), verbose=False, **args)

    model, optimizer = make(0)
    hook = model.decoder.bias.register_hook(lambda g: torch.full_like(g, INF))
    train_lm(model, optimizer, batches[:1])  # an overflow: the scale and its count are not the initial ones
    hook.remove()
    train_lm(model, optimizer, batches[1:3])
    assert (optimizer.loss_scale, optimizer.loss_scaler.clean_steps) == (2 ** 9, 2)
    path = tmp_path / 'checkpoint.pt'
    torch.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict()}, path)
    train_lm(model, optimizer, batches[3:])
    assert optimizer.loss_scale == 2 ** 10  # grew on the first step after the save

    other_model, other_optimizer = make(1)
    checkpoint = torch.load(path, weights_only=True)
    other_model.load_state_dict(checkpoint['model'])
    other_optimizer.load_state_dict(checkpoint['optimizer'])
    train_lm(other_model, other_optimizer, batches[3:])
    assert same(list(model.parameters()), list(other_model.parameters()))
    assert same(optimizer.all_fp32_from_fp16_params, other_optimizer.all_fp32_from_fp16_params)
    assert other_optimizer.loss_scale == optimizer.loss_scale


def test_lbfgs_checkpoint_round_trip_continues_bit_identically(tmp_path):
    x, y = mlp_data()

    def make(seed):
        model = tiny_mlp(seed).half()
        return model, FP16_Optimizer(torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4),
                                     static_loss_scale=64.0, verbose=False)

    def steps(model, optimizer, n):
        def closure():
            optimizer.zero_grad()
            loss = mlp_loss(model, x, y)
            optimizer.backward(loss)
            return loss
        for _ in range(n):
            optimizer.step(closure)

    model, optimizer = make(0)
    steps(model, optimizer, 2)
    torch.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict()}, tmp_path / 'c.pt')
    steps(model, optimizer, 2)
    other_model, other_optimizer = make(1)
    checkpoint = torch.load(tmp_path / 'c.pt', weights_only=True)
    other_model.load_state_dict(checkpoint['model'])
    other_optimizer.load_state_dict(checkpoint['optimizer'])
    steps(other_model, other_optimizer, 2)
    assert same(list(model.parameters()), list(other_model.parameters()))
    assert same(optimizer.all_fp32_from_fp16_params, other_optimizer.all_fp32_from_fp16_params)


# ---------------------------------------------------------------- dynamic loss scale, step by step

class Poisoner:
    """A gradient hook that writes inf into the param's grad on chosen calls (counted from 0)."""

    def __init__(self, param, at):
        self.at, self.calls = set(at), 0
        param.register_hook(self)

    def __call__(self, grad):
        poisoned = self.calls in self.at
        self.calls += 1
        if poisoned:
            grad = grad.clone()
            grad.view(-1)[0] = INF
        return grad


def scale_history(steps, overflow_at, **kw):
    """Run `steps` plain steps of a one-layer fp16 model under FP16_Optimizer; the list of
    (skipped, loss scale after the step)."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 2, bias=False).half()
    # momentum: a step that is not skipped moves the masters even when it has no fresh gradients
    optimizer = FP16_Optimizer(torch.optim.SGD(layer.parameters(), lr=1e-2, momentum=0.5), verbose=False, **kw)
    Poisoner(layer.weight, overflow_at)
    x = torch.full((3, 4), 0.5, dtype=torch.float16)
    master = optimizer.all_fp32_from_fp16_params[0]
    history = []
    for _ in range(steps):
        before = master.detach().clone()
        optimizer.zero_grad()
        # small gradients (~1e-4): no overflow of their own, even at 2**24
        optimizer.backward(layer(x).float().sum() * 2.0 ** -14)
        norm = optimizer.clip_master_grads(1.0)
        assert (norm == -1) if optimizer.overflow else (0 < norm < 1e-3)  # -1: no valid grads to clip
        optimizer.step()
        skipped = torch.equal(before, master)
        assert skipped == optimizer.overflow
        history.append((skipped, optimizer.loss_scale))
    return history


def test_apex_default_dynamic_scale_sequence():
    """Start at 2**16; halve on each overflow (that step is skipped); double after exactly 2000 clean steps."""
    history = scale_history(2005, overflow_at=[0, 3], dynamic_loss_scale=True)
    expected = ([(True, 2 ** 15), (False, 2 ** 15), (False, 2 ** 15), (True, 2 ** 14)]
                + [(False, 2 ** 14)] * 1999     # steps 4..2002: 1999 clean steps
                + [(False, 2 ** 15)]            # step 2003: the 2000th clean step in a row
                + [(False, 2 ** 15)])
    assert history == expected


def test_apex_default_max_loss_scale_caps_growth():
    history = scale_history(2001, overflow_at=[2000], dynamic_loss_scale=True,
                            dynamic_loss_args={'init_scale': 2 ** 30})
    assert history == [(False, 2 ** 24)] * 2000 + [(True, 2 ** 23)]  # capped at the start and at the 2000th step


def test_custom_dynamic_loss_args_sequence():
    args = dict(init_scale=1024, scale_factor=4, scale_window=3, min_loss_scale=16, max_loss_scale=4096)
    history = scale_history(17, overflow_at=[6, 7, 8, 9, 10, 13], dynamic_loss_scale=True, dynamic_loss_args=args)
    assert history == [
        (False, 1024), (False, 1024), (False, 4096),   # 3 clean: x4
        (False, 4096), (False, 4096), (False, 4096),   # 3 clean: x4, capped at 4096
        (True, 1024), (True, 256), (True, 64), (True, 16),  # /4 per overflow
        (True, 16),                                     # floored at min_loss_scale
        (False, 16), (False, 16),
        (True, 16),                                     # the overflow restarts the count; floored again
        (False, 16), (False, 16), (False, 64),          # 3 clean since it
    ]


def test_static_scale_skips_overflowing_steps_and_keeps_the_scale():
    """apex wrote the inf/NaN into the weights; here the step is skipped, and the scale stays."""
    history = scale_history(4, overflow_at=[1, 2], static_loss_scale=512.0)
    assert history == [(False, 512), (True, 512), (True, 512), (False, 512)]


def test_dynamic_closure_overflow_re_evaluates_at_the_lowered_scale(capsys):
    model = tiny_lm().half()
    optimizer = FP16_Optimizer(torch.optim.SGD(model.parameters(), lr=1.0), dynamic_loss_scale=True,
                               dynamic_loss_args={'init_scale': 2 ** 10})
    capsys.readouterr()
    poison = Poisoner(model.decoder.weight, at=[0])
    masters = snapshot(optimizer.all_fp32_from_fp16_params)
    data, targets = lm_batches(1)[0]
    calls = []
    optimizer.step(lm_closure(model, optimizer, data, targets, calls))
    assert len(calls) == poison.calls == 2  # the closure ran again after the overflow
    assert not optimizer.overflow
    assert optimizer.loss_scale == 2 ** 9
    assert not same(masters, optimizer.all_fp32_from_fp16_params)  # the step was made
    assert model_follows_masters(model, optimizer)
    assert 'OVERFLOW within closure! Skipping step, reducing loss scale to 512' in capsys.readouterr().out


def test_lbfgs_dynamic_overflow_in_a_later_evaluation():
    model = tiny_mlp().half()
    x, y = mlp_data()
    optimizer = FP16_Optimizer(torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5), dynamic_loss_scale=True,
                               verbose=False)
    poison = Poisoner(model[2].weight, at=[2])
    calls = []

    def closure():
        assert model_follows_masters(model, optimizer)
        calls.append(1)
        assert len(calls) < 100, 'the closure keeps being evaluated'
        optimizer.zero_grad()
        loss = mlp_loss(model, x, y)
        optimizer.backward(loss)
        return loss

    first = to_python_float(optimizer.step(closure))
    assert poison.calls == len(calls) > 3
    assert optimizer.loss_scale == 2 ** 15 and not optimizer.overflow
    assert model_follows_masters(model, optimizer)
    assert to_python_float(mlp_loss(model, x, y)) < first


def test_static_closure_overflow_raises():
    model = tiny_lm().half()
    optimizer = FP16_Optimizer(torch.optim.SGD(model.parameters(), lr=1.0), static_loss_scale=128.0, verbose=False)
    Poisoner(model.decoder.weight, at=[0])
    masters = snapshot(optimizer.all_fp32_from_fp16_params)
    data, targets = lm_batches(1)[0]
    with pytest.raises(FloatingPointError):
        optimizer.step(lm_closure(model, optimizer, data, targets, []))
    assert same(masters, optimizer.all_fp32_from_fp16_params)
    assert optimizer.loss_scale == 128.0
    # the next step starts afresh
    optimizer.step(lm_closure(model, optimizer, data, targets, []))
    assert not same(masters, optimizer.all_fp32_from_fp16_params) and model_follows_masters(model, optimizer)


def test_dynamic_closure_with_an_infinite_loss_raises_instead_of_looping():
    model = tiny_mlp().half()
    x, y = mlp_data()
    optimizer = FP16_Optimizer(torch.optim.SGD(model.parameters(), lr=0.1), dynamic_loss_scale=True, verbose=False)
    calls = []

    def closure():
        calls.append(1)
        assert len(calls) < 10, 'the closure keeps being evaluated'  # a failure, not a hang
        optimizer.zero_grad()
        loss = mlp_loss(model, x, y) * INF
        optimizer.backward(loss)
        return loss

    with pytest.raises(FloatingPointError):
        optimizer.step(closure)
    assert len(calls) == 1


# ---------------------------------------------------------------- state dicts saved by apex

class amp_scaler:
    """Stands for apex.amp.scaler, whose LossScaler apex's last FP16_Optimizer pickled into its state_dict."""

    class LossScaler:
        def __init__(self, loss_scale, unskipped, scale_seq_len=2000, max_loss_scale=2. ** 24, min_loss_scale=None):
            self.dynamic = loss_scale == 'dynamic'
            self._loss_scale = 2. ** 16 if self.dynamic else loss_scale
            self._unskipped = unskipped
            self._scale_seq_len = scale_seq_len
            self._max_loss_scale = max_loss_scale
            self._min_loss_scale = min_loss_scale
            self._has_overflow = False

        def loss_scale(self):
            return self._loss_scale


class loss_scaler_2018:
    """Stands for apex.fp16_utils.loss_scaler (2018), whose scalers the first FP16_Optimizer pickled."""

    class LossScaler:
        def __init__(self, scale):
            self.cur_scale = scale

    class DynamicLossScaler:
        def __init__(self, cur_scale, cur_iter, last_overflow_iter, scale_factor, scale_window):
            self.cur_scale, self.cur_iter, self.last_overflow_iter = cur_scale, cur_iter, last_overflow_iter
            self.scale_factor, self.scale_window = scale_factor, scale_window


def apex_saved(scaler, dynamic):
    """What apex's FP16_Optimizer.state_dict() held after a few momentum steps: the scaler object
    itself, and the master params themselves. Returns (state_dict, model state_dict, masters)."""
    model = tiny_mlp(seed=5).half()
    optimizer = FP16_Optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), static_loss_scale=64.0,
                               verbose=False)
    x, y = mlp_data()
    for _ in range(3):
        optimizer.zero_grad()
        optimizer.backward(mlp_loss(model, x, y))
        optimizer.step()
    state = {'loss_scaler': scaler, 'dynamic_loss_scale': dynamic, 'overflow': False,
             'first_closure_call_this_step': True, 'optimizer_state_dict': optimizer.optimizer.state_dict(),
             'fp32_from_fp16': optimizer.fp32_from_fp16_groups}
    return state, model.state_dict(), snapshot(optimizer.all_fp32_from_fp16_params)


def load_apex(scaler, dynamic, **kw):
    """A fresh model and FP16_Optimizer (built with kw) that load an apex checkpoint, as apex's docs said:
    model.load_state_dict first, then optimizer.load_state_dict."""
    state, model_state, masters = apex_saved(scaler, dynamic)
    model = tiny_mlp(seed=6).half()
    optimizer = FP16_Optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), verbose=False, **kw)
    model.load_state_dict(model_state)
    optimizer.load_state_dict(state)
    assert same(optimizer.all_fp32_from_fp16_params, masters)
    assert model_follows_masters(model, optimizer)
    momentum = [optimizer.state[m]['momentum_buffer'] for m in optimizer.all_fp32_from_fp16_params]
    assert all(b.dtype == torch.float32 and b.abs().sum() > 0 for b in momentum)
    return model, optimizer


def scale_after_steps(model, optimizer, overflow_at, steps):
    x, y = mlp_data()
    poison = Poisoner(model[2].weight, overflow_at)
    history = []
    for _ in range(steps):
        optimizer.zero_grad()
        optimizer.backward(mlp_loss(model, x, y) * 2.0 ** -10)  # gradients that fit fp16 at 2**17
        optimizer.step()
        history.append((optimizer.overflow, optimizer.loss_scale))
    assert poison.calls == steps
    return history


def test_load_apex_amp_dynamic_scaler():
    scaler = amp_scaler.LossScaler('dynamic', unskipped=1, scale_seq_len=4, max_loss_scale=2. ** 17,
                                   min_loss_scale=2. ** 15)
    # built static: the saved scaler decides
    model, optimizer = load_apex(scaler, True, static_loss_scale=8.0)
    assert optimizer.dynamic_loss_scale is True and optimizer.loss_scale == 2 ** 16
    assert scale_after_steps(model, optimizer, overflow_at=[7, 8, 9], steps=11) == [
        (False, 2 ** 16), (False, 2 ** 16), (False, 2 ** 17),  # 1 + 3 clean steps: the 4th doubles
        (False, 2 ** 17), (False, 2 ** 17), (False, 2 ** 17), (False, 2 ** 17),  # 4 more: capped at 2**17
        (True, 2 ** 16), (True, 2 ** 15), (True, 2 ** 15),  # halved, floored at 2**15
        (False, 2 ** 15)]
    # apex.amp's scaler always halved and doubled: built with scale_factor 4, the loaded optimizer still does
    model, optimizer = load_apex(amp_scaler.LossScaler('dynamic', unskipped=2, scale_seq_len=3), True,
                                 dynamic_loss_scale=True, dynamic_loss_args={'scale_factor': 4.})
    assert scale_after_steps(model, optimizer, overflow_at=[1], steps=5) == [
        (False, 2 ** 17), (True, 2 ** 16), (False, 2 ** 16), (False, 2 ** 16), (False, 2 ** 17)]


def test_load_apex_amp_static_scaler():
    model, optimizer = load_apex(amp_scaler.LossScaler(128.0, unskipped=57), False, dynamic_loss_scale=True)
    assert optimizer.dynamic_loss_scale is False and optimizer.loss_scale == 128.0
    assert scale_after_steps(model, optimizer, overflow_at=[1], steps=3) == [(False, 128), (True, 128), (False, 128)]


def test_load_apex_2018_dynamic_scaler():
    # apex 2018: at iteration i without overflow the scale grew when (i - last_overflow_iter) % scale_window == 0:
    # saved at cur_iter 10 after an overflow at 7, it grows at iteration 12, the third step after loading.
    scaler = loss_scaler_2018.DynamicLossScaler(cur_scale=512.0, cur_iter=10, last_overflow_iter=7, scale_factor=4.0,
                                                scale_window=5)
    model, optimizer = load_apex(scaler, True, static_loss_scale=8.0)
    assert optimizer.dynamic_loss_scale is True and optimizer.loss_scale == 512
    assert scale_after_steps(model, optimizer, overflow_at=[5], steps=11) == [
        (False, 512), (False, 512), (False, 2048),
        (False, 2048), (False, 2048),
        (True, 512),
        (False, 512), (False, 512), (False, 512), (False, 512), (False, 2048)]  # 5 clean since the overflow
    # never below 1, never capped, its own factor
    scaler = loss_scaler_2018.DynamicLossScaler(cur_scale=2.0, cur_iter=0, last_overflow_iter=-1, scale_factor=4.0,
                                                scale_window=1)
    model, optimizer = load_apex(scaler, True, dynamic_loss_scale=True,  # its own cap and floor give way
                                 dynamic_loss_args=dict(scale_factor=2., min_loss_scale=2, max_loss_scale=2))
    assert scale_after_steps(model, optimizer, overflow_at=[0, 1], steps=3) == [(True, 1), (True, 1), (False, 4)]


def test_load_apex_2018_static_scaler():
    model, optimizer = load_apex(loss_scaler_2018.LossScaler(64.0), False, dynamic_loss_scale=True)
    assert optimizer.dynamic_loss_scale is False and optimizer.loss_scale == 64.0
    assert scale_after_steps(model, optimizer, overflow_at=[0], steps=2) == [(True, 64), (False, 64)]


def test_load_apex_state_of_other_shapes_is_refused():
    state, _, _ = apex_saved(amp_scaler.LossScaler(128.0, unskipped=0), False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)).half()
    optimizer = FP16_Optimizer(torch.optim.SGD(model.parameters(), lr=0.1), verbose=False)
    with pytest.raises(ValueError):
        optimizer.load_state_dict(state)


# ---------------------------------------------------------------- converting a model

class Mixed(nn.Module):
    """Embedding, LSTM, Conv1d, affine and non-affine batch-norm, Linear, a float and an int buffer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.lstm = nn.LSTM(6, 6)
        self.conv = nn.Conv1d(6, 4, 1)
        self.bn = nn.BatchNorm1d(4)
        self.bn_plain = nn.BatchNorm1d(4, affine=False)
        self.fc = nn.Linear(4, 3)
        self.register_buffer('offset', torch.ones(3))
        self.register_buffer('count', torch.zeros(1, dtype=torch.long))

    def forward(self, ids, x):
        """ids [seq, batch] (int), x [batch, 6, seq] (float)."""
        h, _ = self.lstm(self.embed(ids))                    # [seq, batch, 6]
        h = self.conv(h.permute(1, 2, 0) + x)                # [batch, 4, seq]
        h = self.bn_plain(self.bn(h))
        return self.fc(h.mean(-1)) + self.offset


def check_mixed_dtypes(net):
    half = torch.float16
    for t in (net.embed.weight, *net.lstm.parameters(), net.conv.weight, net.conv.bias, net.fc.weight, net.fc.bias,
              net.offset, net.bn_plain.running_mean, net.bn_plain.running_var):
        assert t.dtype == half
    for t in (net.bn.weight, net.bn.bias, net.bn.running_mean, net.bn.running_var):
        assert t.dtype == torch.float32
    assert net.count.dtype == net.bn.num_batches_tracked.dtype == torch.long


def test_convert_network_keeps_affine_batchnorm_in_fp32(monkeypatch):
    torch.manual_seed(0)
    net = Mixed()
    flattened = []
    monkeypatch.setattr(nn.LSTM, 'flatten_parameters', lambda self: flattened.append(self))  # a no-op on the CPU
    assert apex['convert_network'](net, torch.half) is net
    check_mixed_dtypes(net)
    assert flattened == [net.lstm]  # the converted RNN's weights are made one block again (for cuDNN)
    assert all(w.dtype == torch.float16 for w in net.lstm._flat_weights)


def test_fp16_model_casts_float_inputs_and_passes_token_ids():
    torch.manual_seed(0)
    model = apex['FP16Model'](Mixed())
    check_mixed_dtypes(model.network)
    seen = {}
    model.network.embed.register_forward_pre_hook(lambda m, args: seen.update(ids=args[0].dtype))
    model.network.conv.register_forward_pre_hook(lambda m, args: seen.update(conv=args[0].dtype))
    model.network.bn.register_forward_pre_hook(lambda m, args: seen.update(bn=args[0].dtype))
    ids = torch.randint(10, (5, 3))
    x = torch.randn(3, 6, 5)  # fp32, cast to half by FP16Model
    out = model(ids, x)
    assert seen == {'ids': torch.long, 'conv': torch.float16, 'bn': torch.float16}
    assert out.dtype == torch.float16 and out.shape == (3, 3)
    # a half input through the fp32 batch-norm trains on the CPU: grads in each param's dtype
    out.float().sum().backward()
    assert model.network.bn.weight.grad.dtype == torch.float32
    assert model.network.conv.weight.grad.dtype == torch.float16
    assert model.network.bn.num_batches_tracked.item() == 1


def test_fp16_model_with_the_project_language_model():
    """Token ids go to the embedding as they are; an fp32 hidden state is cast to half."""
    model = apex['FP16Model'](tiny_lm(rnn_type='GRU'))
    assert all(p.dtype == torch.float16 for p in model.parameters())
    data, targets = lm_batches(1)[0]
    hidden = torch.zeros(1, BSZ, 16)
    output, hidden = model(data, hidden)
    assert output.dtype == hidden.dtype == torch.float16 and output.shape == (BPTT, BSZ, NTOKEN)
    # and it trains under FP16_Optimizer
    optimizer = FP16_Optimizer(torch.optim.SGD(model.parameters(), lr=5.0), static_loss_scale=128.0, verbose=False)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        output, _ = model(data, torch.zeros(1, BSZ, 16))
        loss = criterion(output.view(-1, NTOKEN), targets)
        optimizer.backward(loss)
        optimizer.step()
        losses.append(to_python_float(loss))
    assert losses[-1] < losses[0] - 0.5, losses


def test_network_to_half_casts_every_input():
    torch.manual_seed(0)
    net = apex['network_to_half'](nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    assert isinstance(net[0], apex['tofp16'])
    assert net[1][0].weight.dtype == torch.float16 and net[1][1].weight.dtype == torch.float32
    assert net(torch.randn(3, 4)).dtype == torch.float16


def test_convert_module_converts_own_params_grads_and_buffers_only():
    torch.manual_seed(0)
    outer = nn.Sequential(nn.Linear(3, 3))
    outer.register_parameter('scale', nn.Parameter(torch.ones(3)))
    outer.register_buffer('shift', torch.zeros(3))
    outer.register_buffer('steps', torch.zeros(1, dtype=torch.long))
    outer(torch.randn(2, 3)).mul(outer.scale).sum().backward()
    scale_grad = outer.scale.grad.clone()
    scale = outer.scale
    apex['convert_module'](outer, torch.half)
    assert outer.scale is scale  # the same Parameter, so optimizers built on it still hold it
    assert outer.scale.dtype == outer.scale.grad.dtype == outer.shift.dtype == torch.float16
    assert torch.equal(outer.scale.grad, scale_grad.half())
    assert outer.steps.dtype == torch.long
    assert outer[0].weight.dtype == outer[0].weight.grad.dtype == torch.float32  # children untouched
    apex['convert_module'](outer[0], torch.half)
    assert outer[0].weight.dtype == outer[0].weight.grad.dtype == torch.float16


def test_bn_convert_float_and_tofp16():
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.BatchNorm2d(2, affine=False)).half()
    assert apex['BN_convert_float'](net) is net
    assert net[1].weight.dtype == net[1].running_mean.dtype == torch.float32
    assert net[0].weight.dtype == net[2].running_mean.dtype == torch.float16  # non-affine stays half
    assert apex['tofp16']()(torch.ones(2)).dtype == torch.float16


def test_loss_scalers_as_apex_users_called_them():
    LossScaler, DynamicLossScaler = apex['LossScaler'], apex['DynamicLossScaler']
    static = LossScaler(scale=4)
    grads = static.scale_gradient(None, (torch.ones(2), torch.full((2,), 2.0)), None)
    assert [g.tolist() for g in grads] == [[4.0, 4.0], [8.0, 8.0]]
    w = nn.Parameter(torch.ones(2))
    static.backward((w * 3).sum())
    assert w.grad.tolist() == [12.0, 12.0]
    w.grad[0] = float('nan')
    assert static.has_overflow([w]) is True  # a real check (apex's static scaler always said False)
    static.update_scale(True)
    assert static.loss_scale == 4
    dynamic = DynamicLossScaler(init_scale=8., scale_factor=2., scale_window=2)
    assert dynamic.has_overflow([w]) is True
    for overflow in (True, False, False):
        dynamic.update_scale(overflow)
    assert (dynamic.cur_scale, dynamic.cur_iter, dynamic.last_overflow_iter) == (8., 3, 0)
