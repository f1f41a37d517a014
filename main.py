"""Word-level language model on WikiText-2; --fp16 is the manual mixed precision recipe.

The manual recipe, one update:

    fp16 model --forward/backward of (loss * scale)--> fp16 grads
        --copy, widen--> fp32 master grads --/ scale--> [inf/NaN? skip the update]
        --clip--> SGD on fp32 master weights --copy, round--> fp16 model

fp32 masters keep small updates (lr * grad) that fp16 weights would round away;
the loss scale lifts small gradients above fp16's underflow threshold.
"""
import contextlib

import torch

import training
from fp16_utils import (master_params_to_model_params, model_grads_to_master_grads, prep_param_lists,
                        unscale_master_grads)


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
        model_grads_to_master_grads(self.model_params, self.master_params)
        for p in self.model_params:
            p.grad = None
        if unscale_master_grads(self.master_params, self.loss_scale):
            training.report_skip(self)
            return False
        torch.nn.utils.clip_grad_norm_(self.master_params, self.clip, foreach=True)
        with torch.no_grad():
            torch._foreach_add_(self.master_params, [p.grad for p in self.master_params], alpha=-self.lr)
        master_params_to_model_params(self.model_params, self.master_params)
        return True


if __name__ == '__main__':
    args = training.build_parser('PyTorch WikiText-2 RNN/LSTM language model (manual fp16 recipe)').parse_args()
    run = training.Run(args)
    stepper = ManualFP16Step(run.model, args) if args.fp16 else training.SGDStep(run.model, args)
    training.train(run, stepper)
