"""Word-level language model on WikiText-2; --fp16 wraps the optimizer in FP16_Optimizer.

Same training as main.py, but the fp32 master weights and the loss scale are
FP16_Optimizer's job. The loop calls, for each batch:

    optimizer.backward(loss)             # backward of loss * scale, grads -> fp32 masters, unscale
    optimizer.clip_master_grads(clip)    # clip the masters' gradient norm
    optimizer.step()                     # SGD on the masters (skipped on overflow), copy into the model

With --dynamic-loss-scale the scale starts high, halves on every overflow and
doubles again after 1000 clean steps.
"""

import training

try:  # an old apex that still ships fp16_utils
    from apex.fp16_utils import FP16_Optimizer
    FP16_OPTIMIZER_SOURCE = 'apex.fp16_utils'
except ImportError:
    from fp16_utils import FP16_Optimizer
    FP16_OPTIMIZER_SOURCE = "this example's fp16_utils"


class FP16OptimizerStep(training.SGDStep):
    """fp16 model; torch.optim.SGD wrapped in FP16_Optimizer."""

    def __init__(self, model, args):
        model.half()
        super().__init__(model, args)
        self.optimizer = FP16_Optimizer(self.optimizer, static_loss_scale=args.static_loss_scale,
                                        dynamic_loss_scale=args.dynamic_loss_scale, verbose=False)
        self.dynamic = args.dynamic_loss_scale

    @property
    def loss_scale(self):
        return self.optimizer.loss_scale

    def describe(self):
        scale = 'dynamic loss scale' if self.dynamic else f'static loss scale {self.loss_scale:g}'
        return f'fp16, FP16_Optimizer from {FP16_OPTIMIZER_SOURCE}, {scale}'

    def state_dict(self):
        return {'recipe': self.describe(), 'optimizer': self.optimizer.state_dict(), 'skipped': self.skipped}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state['optimizer'])
        self.skipped = state['skipped']

    def step(self, loss):
        self.optimizer.backward(loss)
        self.optimizer.clip_master_grads(self.clip)
        if self.optimizer.overflow:
            training.report_skip(self)
        self.optimizer.step()
        self.optimizer.zero_grad(set_grads_to_None=True)
        return not self.optimizer.overflow


if __name__ == '__main__':
    parser = training.build_parser('PyTorch WikiText-2 RNN/LSTM language model (FP16_Optimizer recipe)')
    parser.add_argument('--dynamic-loss-scale', action='store_true',
                        help='use a dynamic loss scale (supersedes --static-loss-scale)')
    args = parser.parse_args()
    if args.dynamic_loss_scale and not args.fp16:
        print('Warning: --dynamic-loss-scale only applies with --fp16; ignoring it')
    run = training.Run(args)
    stepper = FP16OptimizerStep(run.model, args) if args.fp16 else training.SGDStep(run.model, args)
    training.train(run, stepper)
