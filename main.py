"""Word-level language model on WikiText-2; --fp16 is the manual mixed precision recipe.

The manual recipe, one update:

    fp16 model --forward/backward of (loss * scale)--> fp16 grads --norm--> [inf/NaN? skip]
        --copy, widen, / scale--> fp32 master grads --clip--> SGD on fp32 master weights
        --copy, round--> fp16 model

fp32 masters keep small updates (lr * grad) that fp16 weights would round away;
the loss scale lifts small gradients above fp16's underflow threshold.
"""
import contextlib
import math

import torch

import training
from fp16_utils import grad_norm, master_params_to_model_params, model_grads_to_master_grads, prep_param_lists


class ManualFP16Step:
    """The recipe above, with the helpers apex.fp16_utils named."""

    def __init__(self, model, args):
        model.half()
        self.model_params, self.master_params = prep_param_lists(model)
        self.loss_scale = args.static_loss_scale
        self.lr = args.lr
        self.clip = args.clip
        self.skipped = 0

    autocast = staticmethod(contextlib.nullcontext)

    def describe(self):
        return f'fp16, manual fp32 master weights, static loss scale {self.loss_scale:g}'

    def step(self, loss):
        (loss * self.loss_scale).backward()
        # The norm of the scaled fp16 grads: inf/NaN means overflow; else it gives the clip factor.
        norm = grad_norm(self.model_params) / self.loss_scale
        if not math.isfinite(norm):
            self.zero_model_grads()
            training.report_skip(self)
            return False
        model_grads_to_master_grads(self.model_params, self.master_params, loss_scale=self.loss_scale)
        self.zero_model_grads()
        master_grads = [p.grad for p in self.master_params]
        clip_coef = self.clip / (norm + 1e-6)
        with torch.no_grad():
            if clip_coef < 1:
                torch._foreach_mul_(master_grads, clip_coef)
            torch._foreach_add_(self.master_params, master_grads, alpha=-self.lr)
        master_params_to_model_params(self.model_params, self.master_params)
        return True

    def state_dict(self):
        return {'recipe': self.describe(), 'masters': [p.detach().clone() for p in self.master_params],
                'lr': self.lr, 'skipped': self.skipped}

    def load_state_dict(self, state):
        if [m.shape for m in state['masters']] != [p.shape for p in self.master_params]:
            raise ValueError('the saved master weights have other shapes')
        with torch.no_grad():
            torch._foreach_copy_(self.master_params, state['masters'])
        master_params_to_model_params(self.model_params, self.master_params)
        self.lr, self.skipped = state['lr'], state['skipped']

    def zero_model_grads(self):
        for p in self.model_params:
            p.grad = None


if __name__ == '__main__':
    args = training.build_parser('PyTorch WikiText-2 RNN/LSTM language model (manual fp16 recipe)').parse_args()
    run = training.Run(args)
    stepper = ManualFP16Step(run.model, args) if args.fp16 else training.SGDStep(run.model, args)
    training.train(run, stepper)
