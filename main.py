"""Word-level language model on WikiText-2; --fp16 is the manual mixed precision recipe.

Read the files in this order: main.py (this recipe, then main() at the bottom), training.py
(the loop it is handed to), model.py and data.py (the model, and how text becomes batches),
fp16_utils.py (the helpers used below), main_fp16_optimizer.py (the same recipe packaged as
FP16_Optimizer), recipes.py (fp32, --amp, --bf16). plumbing/ holds the rest (flags, files,
signals, torchrun, metrics): a first reading can skip it.

The manual recipe, one update:

    fp16 model --forward/backward of (loss * scale)--> fp16 grads --norm--> [inf/NaN? skip]
        --copy, widen, / scale--> fp32 master grads --clip--> SGD (or AdamW) on fp32 master weights
        --copy, round--> fp16 model

fp32 masters keep small updates (lr * grad) that fp16 weights would round away;
the loss scale lifts small gradients above fp16's underflow threshold.
"""
import contextlib
import math
import sys

import torch

import recipes
import training
from fp16_utils import grad_norm, master_params_to_model_params, model_grads_to_master_grads, prep_param_lists
from plumbing import cli


class ManualFP16Recipe:
    """The recipe above, with the helpers apex.fp16_utils named."""

    name = 'fp16-manual'
    def __init__(self, model, lr, clip, loss_scale, adamw=False):
        self.model = model.half()
        self.model_params, self.master_params = prep_param_lists(model)
        # The optimizer sees only the fp32 masters.
        self.optimizer = recipes.make_optimizer(self.master_params, lr, adamw)
        self.optimizer_name = type(self.optimizer).__name__
        self.clip = clip
        self.loss_scale = loss_scale

    def describe(self):
        return f'fp16, manual fp32 master weights, static loss scale {self.loss_scale:g}'

    def autocast(self):
        # The model itself is fp16: nothing to autocast.
        return contextlib.nullcontext()

    def step(self, loss):
        (loss * self.loss_scale).backward()
        # The norm of the scaled fp16 grads (one host sync): inf/NaN means overflow;
        # else it gives the clip factor.
        norm = grad_norm(self.model_params) / self.loss_scale
        if not math.isfinite(norm):
            self.model.zero_grad(set_to_none=True)
            return False
        model_grads_to_master_grads(self.model_params, self.master_params, loss_scale=self.loss_scale)
        self.model.zero_grad(set_to_none=True)
        clip_coef = self.clip / (norm + 1e-6)
        if clip_coef < 1:
            for master in self.master_params:
                master.grad.mul_(clip_coef)
        self.optimizer.step()
        master_params_to_model_params(self.model_params, self.master_params)
        return True

    def state_dict(self):
        return {'masters': [p.detach().clone() for p in self.master_params], 'optimizer': self.optimizer.state_dict()}

    def load_state_dict(self, state):
        if [m.shape for m in state['masters']] != [p.shape for p in self.master_params]:
            raise ValueError('the saved master weights have other shapes')
        with torch.no_grad():
            for master, saved in zip(self.master_params, state['masters']):
                master.copy_(saved)
        self.optimizer.load_state_dict(state['optimizer'])
        master_params_to_model_params(self.model_params, self.master_params)


def main(argv=None):
    args = cli.parse_training_args(cli.training_parser('PyTorch WikiText-2 RNN/LSTM language model (manual fp16 recipe)'), argv)
    setup = training.Setup(args)
    if args.fp16:
        recipe = ManualFP16Recipe(setup.model, args.lr, args.clip, args.static_loss_scale, args.use_optimizer)
    else:
        recipe = recipes.from_flags(setup.model, args)
    return training.train(setup, recipe)


if __name__ == '__main__':
    sys.exit(cli.guarded_main(main))
