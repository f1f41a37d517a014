"""Word-level language model on WikiText-2; --fp16 wraps the optimizer in FP16_Optimizer.

Same training as main.py, but the fp32 master weights and the loss scale are
FP16_Optimizer's job. The recipe's step, for each batch:

    optimizer.backward(loss)             # backward of loss * scale, grads -> fp32 masters, unscale
    optimizer.clip_master_grads(clip)    # clip the masters' gradient norm
    optimizer.step()                     # SGD (or AdamW) on the masters (skipped on overflow), copy into the model

With --dynamic-loss-scale the scale starts at 2**16, halves on every overflow (that
step is skipped) and doubles again after 2000 clean steps, up to 2**24: apex's last defaults.
"""
import contextlib
import sys

import recipes
import training
from plumbing import cli

try:  # an old apex that still ships fp16_utils
    from apex.fp16_utils import FP16_Optimizer
    FP16_OPTIMIZER_SOURCE = 'apex.fp16_utils'
except ImportError:
    from fp16_utils import FP16_Optimizer
    FP16_OPTIMIZER_SOURCE = "this example's fp16_utils"


class FP16OptimizerRecipe:
    """fp16 model; torch.optim.SGD (or AdamW) wrapped in FP16_Optimizer."""

    def __init__(self, model, lr, clip, static_loss_scale=1.0, dynamic_loss_scale=False, adamw=False):
        model.half()
        wrapped = recipes.make_optimizer([p for p in model.parameters() if p.requires_grad], lr, adamw)
        self.optimizer_name = type(wrapped).__name__
        self.optimizer = FP16_Optimizer(wrapped, static_loss_scale=static_loss_scale,
                                        dynamic_loss_scale=dynamic_loss_scale, verbose=False)
        self.clip = clip
        self.name = 'fp16-optimizer-dynamic' if dynamic_loss_scale else 'fp16-optimizer-static'

    def autocast(self):
        # The model itself is fp16: nothing to autocast.
        return contextlib.nullcontext()

    @property
    def loss_scale(self):
        return self.optimizer.loss_scale

    def describe(self):
        scale = 'dynamic loss scale' if self.optimizer.dynamic_loss_scale else f'static loss scale {self.loss_scale:g}'
        return f'fp16, FP16_Optimizer from {FP16_OPTIMIZER_SOURCE}, {scale}'

    def step(self, loss):
        self.optimizer.backward(loss)
        self.optimizer.clip_master_grads(self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_grads_to_None=True)
        return not self.optimizer.overflow

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state)


def main(argv=None):
    parser = cli.training_parser('PyTorch WikiText-2 RNN/LSTM language model (FP16_Optimizer recipe)')
    parser.add_argument('--dynamic-loss-scale', action='store_true',
                        help='use a dynamic loss scale (supersedes --static-loss-scale)')
    args = cli.parse_training_args(parser, argv)
    if args.dynamic_loss_scale and not args.fp16:
        print('Warning: --dynamic-loss-scale only applies with --fp16; ignoring it')
    setup = training.Setup(args)
    if args.fp16:
        recipe = FP16OptimizerRecipe(setup.model, args.lr, args.clip, args.static_loss_scale, args.dynamic_loss_scale,
                                     args.use_optimizer)
    else:
        recipe = recipes.from_flags(setup.model, args)
    return training.train(setup, recipe)


if __name__ == '__main__':
    sys.exit(cli.guarded_main(main))
