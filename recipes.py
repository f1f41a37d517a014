"""Precision recipes: how one update is made. This file holds today's recipes (fp32, --amp,
--bf16); main.py holds the manual fp16 recipe and main_fp16_optimizer.py the FP16_Optimizer one.

Every recipe offers the training loop the same things:

    name          short and stable ('fp32', 'amp', 'bf16', 'fp16-manual', ...): resume compares it
    describe()    one line for the log
    optimizer_name  'SGD' or 'AdamW' (--use-optimizer): what updates the weights the recipe keeps in fp32
    autocast()    the context the forward pass runs in
    step(loss)    backward and update; returns False when the update was skipped
                  (non-finite gradients of a scaled loss); the loop counts the skips
    optimizer     its param_groups hold the learning rate, which the loop anneals
    loss_scale    the current loss scale, or None where the recipe does not scale
    state_dict() / load_state_dict()   what a resumed run needs (masters, optimizer, scaler)
"""
import torch

from plumbing.errors import TrainingDiverged


def make_optimizer(params, lr, adamw=False):
    """Plain SGD (p -= lr * grad), or with adamw (--use-optimizer) torch.optim.AdamW with its
    defaults, as pytorch/examples has it; lr as given for both. One fused kernel on CUDA, one
    foreach pass per op elsewhere."""
    fused = params[0].device.type == 'cuda'
    kind = torch.optim.AdamW if adamw else torch.optim.SGD
    return kind(params, lr=lr, foreach=not fused, fused=fused)


class AutocastRecipe:
    """fp32 weights, updated by SGD (or AdamW) after clipping the gradient norm; the forward pass in autocast_dtype.

    None: plain fp32. torch.float16 (--amp): autocast to fp16, and torch.amp.GradScaler
    scales the loss dynamically. torch.bfloat16 (--bf16): autocast to bf16, which has
    fp32's range, so nothing is scaled.
    """

    def __init__(self, model, lr, clip, autocast_dtype=None, adamw=False):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device_type = self.params[0].device.type
        self.optimizer = make_optimizer(self.params, lr, adamw)
        self.optimizer_name = type(self.optimizer).__name__
        self.clip = clip
        self.autocast_dtype = autocast_dtype
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=autocast_dtype is torch.float16)
        self.name = {None: 'fp32', torch.float16: 'amp', torch.bfloat16: 'bf16'}[autocast_dtype]

    def describe(self):
        return {'fp32': 'fp32',
                'amp': 'amp: autocast float16, fp32 weights, GradScaler (dynamic loss scale)',
                'bf16': 'bf16: autocast bfloat16, fp32 weights, no loss scaling'}[self.name]

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    @property
    def loss_scale(self):
        return self.scaler.get_scale() if self.scaler.is_enabled() else None

    def step(self, loss):
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        finite = bool(torch.isfinite(norm + loss.detach()))  # the step's one host sync
        if finite:
            # What scaler.step would do, with the check above: the grads are unscaled already, and a
            # skipped step leaves the optimizer's state (AdamW's moments and step count) as it was.
            self.optimizer.step()
        elif not self.scaler.is_enabled() or not torch.isfinite(loss):
            # An inf/NaN loss, or gradients that were not scaled, cannot be overflow.
            raise TrainingDiverged()
        self.scaler.update()  # lowers the scale if unscale_ found inf/NaN, raises it after 2000 clean steps
        self.optimizer.zero_grad(set_to_none=True)
        return finite

    def state_dict(self):
        return {'optimizer': self.optimizer.state_dict(), 'scaler': self.scaler.state_dict()}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state['optimizer'])
        self.scaler.load_state_dict(state['scaler'])


def from_flags(model, args):
    """The recipe for fp32, --amp or --bf16."""
    dtype = torch.float16 if args.amp else torch.bfloat16 if args.bf16 else None
    return AutocastRecipe(model, args.lr, args.clip, dtype, args.use_optimizer)
