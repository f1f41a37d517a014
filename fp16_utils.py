"""fp16 training helpers under the names of apex.fp16_utils (removed from apex in 2025).

Written for this project from apex's documented behaviour, so that code written
against apex's API runs unchanged. The master-weight bookkeeping lives here once
and is used both by FP16_Optimizer and by main.py's manual recipe.

Unlike apex, which synced with the host once per parameter to look for inf/NaN,
overflow is found from the total gradient norm with one sync per step, and the
fp16 grads are widened and unscaled into the master grads in a single pass.
"""
import math

import torch
import torch.nn as nn
from torch._utils import _flatten_dense_tensors


# ---------------------------------------------------------------- helpers

def to_python_float(t):
    """A Python float from a one-element tensor (or a number)."""
    if hasattr(t, 'item'):
        return t.item()
    return float(t) if isinstance(t, (int, float)) else float(t[0])


class tofp16(nn.Module):
    """A layer that casts its input to half precision."""

    def forward(self, input):
        return input.half()


def BN_convert_float(module):
    """Put affine batch-norm layers back into fp32 (as apex did), so their statistics and weights keep fp32 precision."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
        module.float()
    for child in module.children():
        BN_convert_float(child)
    return module


def network_to_half(network):
    """The network in half precision, batch-norm kept in fp32, inputs cast to half."""
    return nn.Sequential(tofp16(), BN_convert_float(network.half()))


def _flat_views(flat, like):
    """Views of the 1-D tensor flat shaped as the tensors in like, in order."""
    views = flat.split([t.numel() for t in like])
    return [v.view_as(t) for v, t in zip(views, like)]


def prep_param_lists(model, flat_master=False):
    """(model_params, master_params): the trainable params and fp32 copies of them.

    With flat_master the masters are one contiguous fp32 Parameter holding all of
    them, which lets the optimizer run as a single kernel per op. It needs all
    params to share a dtype.
    """
    model_params = [p for p in model.parameters() if p.requires_grad]
    if flat_master:
        if len({p.dtype for p in model_params}) > 1:
            raise ValueError('flat_master needs all model parameters to have the same dtype.')
        master = nn.Parameter(_flatten_dense_tensors([p.detach() for p in model_params]).float())
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
        master_params[0].grad.copy_(_flatten_dense_tensors(grads))
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
        sources = _flat_views(master_params[0].detach(), model_params)
    else:
        sources = [m.detach() for m in master_params]
    with torch.no_grad():
        torch._foreach_copy_([p for p in model_params], sources)


def grad_norm(params):
    """The total 2-norm of the params' grads, accumulated in fp32, as a Python float.

    inf or NaN when any grad holds inf or NaN, so it doubles as the overflow check.
    It reads each grad once (fp16 grads at half the bytes of fp32 masters) and its
    .item() is the only device-to-host sync of an fp16 step.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms)).item()


# ---------------------------------------------------------------- loss scalers

class LossScaler:
    """A static loss scale: the loss is multiplied by scale before backward."""

    def __init__(self, scale=1.0):
        self.cur_scale = float(scale)

    @property
    def loss_scale(self):
        return self.cur_scale

    def has_overflow(self, params):
        grads = [p.grad for p in params if p.grad is not None]
        return any(not torch.isfinite(g).all() for g in grads)

    def update_scale(self, overflow):
        pass

    def backward(self, loss, retain_graph=False):
        (loss * self.loss_scale).backward(retain_graph=retain_graph)

    def state_dict(self):
        return {'cur_scale': self.cur_scale}

    def load_state_dict(self, state):
        self.cur_scale = float(state['cur_scale'])


class DynamicLossScaler(LossScaler):
    """A loss scale that halves on overflow (never below 1) and doubles after
    scale_window steps in a row without one."""

    def __init__(self, init_scale=2 ** 32, scale_factor=2.0, scale_window=1000):
        super().__init__(init_scale)
        self.scale_factor = float(scale_factor)
        self.scale_window = int(scale_window)
        self.clean_steps = 0  # steps since the last overflow (or the last increase)

    def update_scale(self, overflow):
        if overflow:
            self.cur_scale = max(self.cur_scale / self.scale_factor, 1.0)
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps == self.scale_window:
            self.cur_scale *= self.scale_factor
            self.clean_steps = 0

    def state_dict(self):
        return {'cur_scale': self.cur_scale, 'scale_factor': self.scale_factor,
                'scale_window': self.scale_window, 'clean_steps': self.clean_steps}

    def load_state_dict(self, state):
        self.cur_scale = float(state['cur_scale'])
        self.scale_factor = float(state['scale_factor'])
        self.scale_window = int(state['scale_window'])
        self.clean_steps = int(state['clean_steps'])


# ---------------------------------------------------------------- FP16_Optimizer

class FP16_Optimizer:
    """Wraps an optimizer built on a half-precision model.

    Each fp16 param of the wrapped optimizer's groups is replaced there by an fp32
    master copy (fp32 params stay as they are), so the optimizer updates masters:

        loss -> backward(loss * scale) -> fp16 grads -> master grads / scale
             -> [overflow? skip step, maybe lower scale] -> clip -> step on masters
             -> masters copied back into the fp16 model
    """

    def __init__(self, init_optimizer, static_loss_scale=1.0, dynamic_loss_scale=False,
                 dynamic_loss_args=None, verbose=True):
        self.optimizer = init_optimizer
        self.verbose = verbose
        self.fp16_groups = []             # the model's half params, per group
        self.fp32_from_fp16_groups = []   # their fp32 masters
        self.fp32_from_fp32_groups = []   # params that were fp32 already
        for group in self.optimizer.param_groups:
            fp16_params, masters, fp32_params, params = [], [], [], []
            for param in group['params']:
                if not param.requires_grad:
                    params.append(param)
                elif param.dtype == torch.float16:
                    master = nn.Parameter(param.detach().clone().float())
                    if param in self.optimizer.state:
                        self.optimizer.state[master] = self.optimizer.state.pop(param)
                    fp16_params.append(param)
                    masters.append(master)
                    params.append(master)
                elif param.dtype == torch.float32:
                    fp32_params.append(param)
                    params.append(param)
                else:
                    raise TypeError(f'FP16_Optimizer handles float16 and float32 params, not {param.dtype}.')
            group['params'] = params
            self.fp16_groups.append(fp16_params)
            self.fp32_from_fp16_groups.append(masters)
            self.fp32_from_fp32_groups.append(fp32_params)
        # Round-trip the state so any existing state tensors follow the masters' dtype.
        self.optimizer.load_state_dict(self.optimizer.state_dict())
        if dynamic_loss_scale:
            self.dynamic_loss_scale = True
            self.loss_scaler = DynamicLossScaler(**(dynamic_loss_args or {}))
        else:
            self.dynamic_loss_scale = False
            self.loss_scaler = LossScaler(static_loss_scale)
        self.overflow = False

    # Flat lists over all groups.
    def _fp16_params(self):
        return [p for g in self.fp16_groups for p in g]

    def _fp32_from_fp16(self):
        return [p for g in self.fp32_from_fp16_groups for p in g]

    def _master_params(self):
        return [p for group in self.optimizer.param_groups for p in group['params'] if p.requires_grad]

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def loss_scale(self):
        return self.loss_scaler.loss_scale

    def zero_grad(self, set_grads_to_None=False):
        """Clear the model's grads (the masters' are overwritten from them each step)."""
        for p in self._fp16_params() + [p for g in self.fp32_from_fp32_groups for p in g]:
            if set_grads_to_None:
                p.grad = None
            elif p.grad is not None:
                p.grad.detach_().zero_()

    def backward(self, loss, update_master_grads=True, retain_graph=False):
        """Backward of loss * loss_scale; then, by default, fill the master grads."""
        self.loss_scaler.backward(loss.float(), retain_graph=retain_graph)
        if update_master_grads:
            self.update_master_grads()

    def update_master_grads(self):
        """Check the model's grads for overflow; if none, copy them into the masters, unscaled."""
        fp32_params = [p for g in self.fp32_from_fp32_groups for p in g]
        self.overflow = not math.isfinite(grad_norm(self._fp16_params() + fp32_params))
        if self.overflow:
            return
        model_grads_to_master_grads(self._fp16_params(), self._fp32_from_fp16(), loss_scale=self.loss_scale)
        fp32_grads = [p.grad for p in fp32_params if p.grad is not None]
        if fp32_grads and self.loss_scale != 1.0:
            torch._foreach_mul_(fp32_grads, 1.0 / self.loss_scale)

    def clip_master_grads(self, max_norm, norm_type=2):
        """Clip the master grads' total norm to max_norm; return the norm, or -1 on overflow."""
        if self.overflow:
            return -1
        return torch.nn.utils.clip_grad_norm_(self._master_params(), max_norm, norm_type, foreach=True)

    def step(self, closure=None):
        """Step on the masters and copy them into the model; on overflow, skip and rescale.

        A closure, if given, is called first and must call self.backward(loss).
        """
        loss = closure() if closure is not None else None
        scale = self.loss_scale
        self.loss_scaler.update_scale(self.overflow)
        if self.overflow:
            if self.verbose:
                print(f'OVERFLOW! Skipping step. Attempted loss scale: {scale:g}, '
                      f'reducing to {self.loss_scale:g}')
            return loss
        self.optimizer.step()
        master_params_to_model_params(self._fp16_params(), self._fp32_from_fp16())
        return loss

    def state_dict(self):
        """Everything needed to resume exactly: scaler, wrapped optimizer and masters."""
        return {
            'dynamic_loss_scale': self.dynamic_loss_scale,
            'loss_scaler': self.loss_scaler.state_dict(),
            'overflow': self.overflow,
            'optimizer_state_dict': self.optimizer.state_dict(),
            'fp32_from_fp16': [[p.detach().clone() for p in g] for g in self.fp32_from_fp16_groups],
        }

    def load_state_dict(self, state_dict):
        if state_dict['dynamic_loss_scale'] != self.dynamic_loss_scale:
            kind = 'dynamic' if state_dict['dynamic_loss_scale'] else 'static'
            raise ValueError(f'the saved FP16_Optimizer used a {kind} loss scale; this one does not.')
        self.loss_scaler.load_state_dict(state_dict['loss_scaler'])
        self.overflow = state_dict['overflow']
        self.optimizer.load_state_dict(state_dict['optimizer_state_dict'])
        saved = state_dict['fp32_from_fp16']
        if [[p.shape for p in g] for g in saved] != [[p.shape for p in g] for g in self.fp32_from_fp16_groups]:
            raise ValueError('the saved FP16_Optimizer holds master weights of other shapes.')
        with torch.no_grad():
            for current, stored in zip(self.fp32_from_fp16_groups, saved):
                for p, s in zip(current, stored):
                    p.copy_(s)
        master_params_to_model_params(self._fp16_params(), self._fp32_from_fp16())

    def __repr__(self):
        return f'FP16_Optimizer(loss_scale={self.loss_scale:g}, dynamic={self.dynamic_loss_scale}, {self.optimizer!r})'
