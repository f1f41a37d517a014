"""apex.fp16_utils (removed from apex in 2025), written for this project from apex's
documented behaviour, so that code written against it runs unchanged:

    from fp16_utils import *          # instead of: from apex.fp16_utils import *

Manual master weights: prep_param_lists, model_grads_to_master_grads,
master_params_to_model_params, clip_grad_norm. Converting a model: network_to_half,
FP16Model, convert_network, convert_module, BN_convert_float, tofp16. Loss scaling:
LossScaler, DynamicLossScaler. All of it packaged: FP16_Optimizer.

Where this module differs from apex, and why, is listed in the README (fp16_utils).
"""
import math

import torch
import torch.nn as nn

__all__ = ['BN_convert_float', 'network_to_half', 'prep_param_lists', 'model_grads_to_master_grads',
           'master_params_to_model_params', 'tofp16', 'to_python_float', 'clip_grad_norm', 'convert_module',
           'convert_network', 'FP16Model', 'FP16_Optimizer', 'LossScaler', 'DynamicLossScaler']

clip_grad_norm = torch.nn.utils.clip_grad_norm_


def to_python_float(t):
    """A Python float from a one-element tensor (or a number)."""
    if hasattr(t, 'item'):
        return t.item()
    return float(t) if isinstance(t, (int, float)) else float(t[0])


def grad_norm(params):
    """The total 2-norm of the params' grads, accumulated in fp32, as a Python float.

    inf or NaN when any grad holds inf or NaN, so it doubles as the overflow check; its
    .item() is the only device-to-host sync of an fp16 step. (Not part of apex's API.)
    """
    norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float32) for p in params if p.grad is not None]
    if not norms:
        return 0.0
    return torch.linalg.vector_norm(torch.stack(norms)).item()


# ---------------------------------------------------------------- converting a model

class tofp16(nn.Module):
    """A layer that casts its input to half precision."""

    def forward(self, input):
        return input.half()


def is_affine_batchnorm(module):
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine


def BN_convert_float(module):
    """Put affine batch-norm layers back into fp32, so their statistics and weights keep fp32 precision."""
    if is_affine_batchnorm(module):
        module.float()
    for child in module.children():
        BN_convert_float(child)
    return module


def network_to_half(network):
    """The network in half precision, batch-norm kept in fp32, inputs cast to half."""
    return nn.Sequential(tofp16(), BN_convert_float(network.half()))


def convert_module(module, dtype):
    """Convert the module's own floating-point parameters (and their grads) and buffers to dtype."""
    for param in module.parameters(recurse=False):
        if param.is_floating_point():
            param.data = param.data.to(dtype)
            if param.grad is not None:
                param.grad = param.grad.to(dtype)
    for name, buf in module.named_buffers(recurse=False):
        if buf.is_floating_point():
            setattr(module, name, buf.to(dtype))


def convert_network(network, dtype):
    """Convert every module of the network to dtype except affine batch-norm layers, which stay as they are."""
    for module in network.modules():
        if is_affine_batchnorm(module):
            continue
        convert_module(module, dtype)
        if isinstance(module, nn.RNNBase):
            module.flatten_parameters()  # cuDNN wants the weights in one block again
    return network


class FP16Model(nn.Module):
    """The network in half precision (affine batch-norm in fp32); floating-point inputs are cast to half."""

    def __init__(self, network):
        super().__init__()
        self.network = convert_network(network, dtype=torch.half)

    def forward(self, *inputs):
        return self.network(*(t.half() if t.is_floating_point() else t for t in inputs))


# ---------------------------------------------------------------- manual master weights

def prep_param_lists(model, flat_master=False):
    """(model_params, master_params): the trainable params and fp32 copies of them.

    With flat_master the masters are one contiguous fp32 Parameter holding all of
    them, which lets the optimizer run as a single kernel per op. It needs all
    params to share a dtype.
    """
    model_params = [p for p in model.parameters() if p.requires_grad]
    if flat_master:
        if len({p.dtype for p in model_params}) > 1:
            raise ValueError('flat_master needs all model parameters to have the same dtype; '
                             'use flat_master=False or FP16_Optimizer.')
        master = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in model_params]).float())
        master.grad = torch.zeros_like(master)
        return model_params, [master]
    master_params = [nn.Parameter(p.detach().clone().float()) for p in model_params]
    return model_params, master_params


def model_grads_to_master_grads(model_params, master_params, flat_master=False, loss_scale=1.0):
    """Copy (and widen) the model's grads into the masters' grads, divided by loss_scale.

    loss_scale is this project's addition to apex's signature: the division happens
    in the same pass as the copy (fp16 grad read, fp32 grad written), computed in fp32.
    """
    if flat_master:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model_params]
        master_params[0].grad.copy_(torch.cat([g.reshape(-1) for g in grads]))
        if loss_scale != 1.0:
            master_params[0].grad.mul_(1.0 / loss_scale)
        return
    # A one-element fp32 tensor (not 0-dim) makes fp16 * it compute and store in fp32.
    inv_scale = None
    for master, param in zip(master_params, model_params):
        if param.grad is None:
            master.grad = None
            continue
        if master.grad is None:
            master.grad = torch.empty_like(master)
        if loss_scale == 1.0:
            master.grad.copy_(param.grad)
        else:
            if inv_scale is None:
                inv_scale = torch.full((1,), 1.0 / loss_scale, device=master.device)
            torch.mul(param.grad, inv_scale, out=master.grad)


def master_params_to_model_params(model_params, master_params, flat_master=False):
    """Copy (and round) the master weights into the model's weights."""
    if flat_master:
        flat = master_params[0].detach()
        sources = [v.view_as(p) for v, p in zip(flat.split([p.numel() for p in model_params]), model_params)]
    else:
        sources = [m.detach() for m in master_params]
    with torch.no_grad():
        for param, source in zip(model_params, sources):
            param.copy_(source)


# ---------------------------------------------------------------- loss scalers used on their own

class LossScaler:
    """A static loss scale: the loss is multiplied by scale before backward."""

    def __init__(self, scale=1):
        self.cur_scale = scale

    @property
    def loss_scale(self):
        return self.cur_scale

    def has_overflow(self, params):
        """Whether any param's grad holds inf or NaN (apex's static scaler always said no)."""
        return any(p.grad is not None and self._has_inf_or_nan(p.grad) for p in params)

    @staticmethod
    def _has_inf_or_nan(x):
        return not torch.isfinite(x).all()

    def update_scale(self, overflow):
        pass

    def scale_gradient(self, module, grad_in, grad_out):
        return tuple(self.loss_scale * g for g in grad_in)

    def backward(self, loss, retain_graph=False):
        (loss * self.loss_scale).backward(retain_graph=retain_graph)


class DynamicLossScaler(LossScaler):
    """A loss scale that drops by scale_factor on an overflow (never below 1) and grows by
    it after scale_window steps in a row without one. These defaults (first scale 2**32,
    window 1000) are this class's own; FP16_Optimizer's dynamic scale has apex's later ones."""

    def __init__(self, init_scale=2 ** 32, scale_factor=2., scale_window=1000):
        super().__init__(init_scale)
        self.cur_iter = 0
        self.last_overflow_iter = -1
        self.scale_factor = scale_factor
        self.scale_window = scale_window

    def update_scale(self, overflow):
        if overflow:
            self.cur_scale = max(self.cur_scale / self.scale_factor, 1)
            self.last_overflow_iter = self.cur_iter
        elif (self.cur_iter - self.last_overflow_iter) % self.scale_window == 0:
            self.cur_scale *= self.scale_factor
        self.cur_iter += 1


# ---------------------------------------------------------------- FP16_Optimizer

class OptimizerLossScale:
    """FP16_Optimizer's loss scale, static or dynamic, with the dynamic rules of apex's last
    FP16_Optimizer: start at min(init_scale, max_loss_scale); on an overflow divide by
    scale_factor (not below min_loss_scale, when given); after scale_window clean steps in a
    row multiply by it (not above max_loss_scale)."""

    def __init__(self, scale, dynamic=False, init_scale=2. ** 16, scale_factor=2., scale_window=2000,
                 min_loss_scale=None, max_loss_scale=2. ** 24):
        self.dynamic = dynamic
        self.scale = min(init_scale, max_loss_scale) if dynamic else scale
        self.scale_factor = scale_factor
        self.scale_window = scale_window
        self.min_loss_scale = min_loss_scale
        self.max_loss_scale = max_loss_scale
        self.clean_steps = 0  # steps without an overflow since the last change of the scale

    def update(self, overflow):
        if not self.dynamic:
            return
        if overflow:
            self.scale /= self.scale_factor
            if self.min_loss_scale:
                self.scale = max(self.scale, self.min_loss_scale)
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps == self.scale_window:
            self.scale = min(self.scale * self.scale_factor, self.max_loss_scale)
            self.clean_steps = 0

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, state):
        """Our own state dict, or the scaler object an apex FP16_Optimizer pickled."""
        if isinstance(state, dict):
            vars(self).update(state)
        elif hasattr(state, '_loss_scale'):  # apex.amp.scaler.LossScaler (apex 0.1 and later)
            self.dynamic, self.scale, self.clean_steps = bool(state.dynamic), float(state._loss_scale), int(state._unskipped)
            self.scale_window, self.max_loss_scale = state._scale_seq_len, state._max_loss_scale
            self.min_loss_scale = state._min_loss_scale
            self.scale_factor = 2.  # apex.amp's scaler always halved and doubled (it ignored scale_factor)
        elif hasattr(state, 'cur_scale'):  # apex.fp16_utils' LossScaler or DynamicLossScaler (2018)
            self.dynamic, self.scale = hasattr(state, 'last_overflow_iter'), float(state.cur_scale)
            if self.dynamic:
                self.scale_factor, self.scale_window = state.scale_factor, state.scale_window
                self.clean_steps = (state.cur_iter - state.last_overflow_iter - 1) % state.scale_window
                self.max_loss_scale = math.inf
                self.min_loss_scale = 1
        else:
            raise TypeError(f'cannot read a loss scaler from {type(state).__name__}')


class FP16_Optimizer:
    """Wraps an optimizer built on a half-precision model.

    Each fp16 param of the wrapped optimizer's groups is replaced there by an fp32
    master copy (fp32 params stay as they are), so the optimizer updates masters:

        backward(loss): backward of loss * scale -> fp16 grads -> [inf/NaN? overflow, lower
            a dynamic scale] -> master grads / scale
        clip_master_grads(max_norm) -> step(): the wrapped optimizer's step on the masters
            (skipped after an overflow), masters copied back into the fp16 model

    dynamic_loss_args: init_scale (2**16), scale_factor (2), scale_window (2000),
    min_loss_scale (None), max_loss_scale (2**24).
    """

    def __init__(self, init_optimizer, static_loss_scale=1.0, dynamic_loss_scale=False,
                 dynamic_loss_args=None, verbose=True):
        self.verbose = verbose
        self.optimizer = init_optimizer
        self.fp16_groups = []             # the model's half params, per group
        self.fp32_from_fp16_groups = []   # their fp32 masters
        self.fp32_from_fp32_groups = []   # params that were fp32 already
        for i, group in enumerate(self.optimizer.param_groups):
            self.maybe_print(f'FP16_Optimizer processing param group {i}:')
            fp16_params, masters, fp32_params = [], [], []
            for j, param in enumerate(group['params']):
                if not param.requires_grad:
                    continue
                self.maybe_print(f'FP16_Optimizer received {param.type()} with {param.size()}')
                if param.dtype == torch.float16:
                    master = nn.Parameter(param.detach().clone().float())
                    if param in self.optimizer.state:
                        self.optimizer.state[master] = self.optimizer.state.pop(param)
                    group['params'][j] = master
                    fp16_params.append(param)
                    masters.append(master)
                elif param.dtype == torch.float32:
                    fp32_params.append(param)
                else:
                    raise TypeError(f'Wrapped parameters must be float16 or float32 tensors, not {param.dtype}.')
            self.fp16_groups.append(fp16_params)
            self.fp32_from_fp16_groups.append(masters)
            self.fp32_from_fp32_groups.append(fp32_params)
        self.all_fp16_params = [p for g in self.fp16_groups for p in g]
        self.all_fp32_from_fp16_params = [p for g in self.fp32_from_fp16_groups for p in g]
        self.all_fp32_from_fp32_params = [p for g in self.fp32_from_fp32_groups for p in g]
        # Round-trip the state so any existing state tensors follow the masters' dtype.
        self.optimizer.load_state_dict(self.optimizer.state_dict())
        self.dynamic_loss_scale = bool(dynamic_loss_scale)
        self.loss_scaler = OptimizerLossScale(static_loss_scale, self.dynamic_loss_scale, **(dynamic_loss_args or {}))
        self.overflow = False
        self.first_closure_call_this_step = True
        self.clip_grad_norm = clip_grad_norm

    def maybe_print(self, msg):
        if self.verbose:
            print(msg)

    def __getstate__(self):
        raise RuntimeError('FP16_Optimizer should be serialized using state_dict().')

    def __setstate__(self, state):
        raise RuntimeError('FP16_Optimizer should be deserialized using load_state_dict().')

    @property
    def loss_scale(self):
        return self.loss_scaler.scale

    @loss_scale.setter
    def loss_scale(self, value):
        self.loss_scaler.scale = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    def master_params(self):
        return [p for group in self.optimizer.param_groups for p in group['params'] if p.requires_grad]

    def zero_grad(self, set_grads_to_None=False):
        """Clear the grads of the masters (and fp32 params) and of the fp16 model."""
        for p in [p for group in self.optimizer.param_groups for p in group['params']] + self.all_fp16_params:
            if set_grads_to_None:
                p.grad = None
            elif p.grad is not None:
                p.grad.detach_()
                p.grad.zero_()

    def backward(self, loss, update_master_grads=True, retain_graph=False):
        """Backward of loss * loss_scale (the loss in fp32); then, by default, update_master_grads()."""
        (loss.float() * self.loss_scale).backward(retain_graph=retain_graph)
        if update_master_grads:
            self.update_master_grads()

    def update_master_grads(self):
        """Look for inf/NaN in the model's grads (one host sync), update a dynamic scale, and
        unless they overflowed, copy them into the masters' grads divided by the scale."""
        self.overflow = not math.isfinite(grad_norm(self.all_fp16_params + self.all_fp32_from_fp32_params))
        scale = self.loss_scale
        self.loss_scaler.update(self.overflow)
        if self.overflow:
            return
        model_grads_to_master_grads(self.all_fp16_params, self.all_fp32_from_fp16_params, loss_scale=scale)
        if scale != 1.0:
            for p in self.all_fp32_from_fp32_params:
                if p.grad is not None:
                    p.grad.mul_(1.0 / scale)

    def inspect_master_grad_data(self):
        """The masters' grads as a list per param group (None where a master has none);
        None after an overflow, when they are not valid."""
        if self.overflow:
            print('Warning:  calling FP16_Optimizer.inspect_master_grad_data while in an overflow state.  '
                  'Gradients are currently invalid (may be inf, nan, or stale).  Returning None.')
            return None
        return [[None if p.grad is None else p.grad.data for p in group['params']]
                for group in self.optimizer.param_groups]

    def clip_master_grads(self, max_norm, norm_type=2):
        """Clip the master grads' total norm to max_norm; return the norm, or -1 after an overflow."""
        if self.overflow:
            return -1
        return self.clip_grad_norm(self.master_params(), max_norm, norm_type)

    def step(self, closure=None):
        """Step the wrapped optimizer on the masters and copy them into the model.

        Without a closure, call backward(loss) first; after an overflow the step is skipped.
        A closure must call zero_grad(), compute the loss, call self.backward(loss) and
        return the loss; it may be evaluated several times (LBFGS), and with a dynamic scale
        it is evaluated again, at the lowered scale, after an overflow.
        """
        if closure is not None:
            retval = self._step_with_closure(closure)
        elif self.overflow:
            self.maybe_print(f'Gradient overflow.  Skipping step, reducing loss scale to {self.loss_scale:g}')
            return None
        else:
            retval = self.optimizer.step()
        master_params_to_model_params(self.all_fp16_params, self.all_fp32_from_fp16_params)
        return retval

    def _step_with_closure(self, closure):
        def evaluate():
            if self.first_closure_call_this_step:
                self.first_closure_call_this_step = False
            else:  # the optimizer moved the masters since the last evaluation
                master_params_to_model_params(self.all_fp16_params, self.all_fp32_from_fp16_params)
            loss = closure()
            while self.overflow:
                if not self.dynamic_loss_scale:
                    raise FloatingPointError(f'the gradients overflowed at the static loss scale {self.loss_scale:g} '
                                             'inside step(closure); use a smaller scale or a dynamic one.')
                if not math.isfinite(to_python_float(loss)):
                    raise FloatingPointError('the loss is inf or NaN; no loss scale can help.')
                self.maybe_print(f'OVERFLOW within closure! Skipping step, reducing loss scale to {self.loss_scale:g}')
                loss = closure()
            return loss

        try:
            return self.optimizer.step(evaluate)
        finally:
            self.first_closure_call_this_step = True

    def state_dict(self):
        """apex's keys, with the loss scaler's state as plain data (loads with weights_only=True)."""
        return {
            'loss_scaler': self.loss_scaler.state_dict(),
            'dynamic_loss_scale': self.dynamic_loss_scale,
            'overflow': self.overflow,
            'first_closure_call_this_step': self.first_closure_call_this_step,
            'optimizer_state_dict': self.optimizer.state_dict(),
            'fp32_from_fp16': [[p.detach().clone() for p in g] for g in self.fp32_from_fp16_groups],
        }

    def load_state_dict(self, state_dict):
        """Load a state_dict() of this class or of apex's FP16_Optimizer (call model.load_state_dict first)."""
        saved = state_dict['fp32_from_fp16']
        if [[p.shape for p in g] for g in saved] != [[p.shape for p in g] for g in self.fp32_from_fp16_groups]:
            raise ValueError('the saved FP16_Optimizer holds master weights of other shapes.')
        self.loss_scaler.load_state_dict(state_dict['loss_scaler'])
        self.dynamic_loss_scale = bool(state_dict['dynamic_loss_scale'])
        self.loss_scaler.dynamic = self.dynamic_loss_scale
        self.overflow = state_dict['overflow']
        self.first_closure_call_this_step = state_dict.get('first_closure_call_this_step', True)
        self.optimizer.load_state_dict(state_dict['optimizer_state_dict'])
        with torch.no_grad():
            for current, stored in zip(self.all_fp32_from_fp16_params, [p for g in saved for p in g]):
                current.copy_(stored)
        master_params_to_model_params(self.all_fp16_params, self.all_fp32_from_fp16_params)

    def __repr__(self):
        return f'FP16_Optimizer(loss_scale={self.loss_scale:g}, dynamic={self.dynamic_loss_scale}, {self.optimizer!r})'
