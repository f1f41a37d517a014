"""Time one FP16_Optimizer update (master grads, unscale, overflow check, clip, step, copy back)
against the same update done parameter by parameter with one host sync per parameter, as apex did.
Run from the repository root:

    python3 -m benchmarks.fp16_optimizer            # apex's model: 1504/1504 LSTM, vocab 33,280
    python3 -m benchmarks.fp16_optimizer --cuda --steps 50
"""
import sys
import time

import torch

from fp16_utils import FP16_Optimizer
from model import RNNModel
from plumbing import cli

PROG = 'python3 -m benchmarks.fp16_optimizer'


class PerParameterSync:
    """The same update, one parameter at a time, one .item() sync per parameter for overflow."""

    def __init__(self, model, lr, loss_scale):
        self.model_params = [p for p in model.parameters() if p.requires_grad]
        self.masters = [p.detach().clone().float() for p in self.model_params]
        self.lr, self.loss_scale = lr, loss_scale

    def update(self, clip):
        for p in self.model_params:
            if torch.isinf(p.grad).any().item() or torch.isnan(p.grad).any().item():
                return False
        grads = [p.grad.float() / self.loss_scale for p in self.model_params]
        total = torch.norm(torch.stack([g.norm() for g in grads]))
        coef = min(clip / (total.item() + 1e-6), 1.0)
        for master, grad, param in zip(self.masters, grads, self.model_params):
            master.add_(grad, alpha=-self.lr * coef)
            param.data.copy_(master)
        return True


def time_updates(update, grads_to_model, steps, device):
    for _ in range(3):
        grads_to_model()
        update()
    if device.type != 'cpu':
        torch.accelerator.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        grads_to_model()
        update()
    if device.type != 'cpu':
        torch.accelerator.synchronize(device)
    return 1000 * (time.perf_counter() - start) / steps


def main(argv=None):
    p = cli.ArgumentParser(prog=PROG,
                                description='Time one fp16 optimizer update, fused against per-parameter sync.')
    p.add_argument('--emsize', type=int, default=1504, help='word embedding width')
    p.add_argument('--nhid', type=int, default=1504, help='hidden state width of each of the 2 LSTM layers')
    p.add_argument('--ntokens', type=int, default=33280, help='vocabulary size')
    p.add_argument('--steps', type=int, default=10, help='timed updates of each kind, per round (after 3 untimed)')
    cli.add_device_flags(p)
    args = p.parse_args(argv)
    cli.check_at_least_1(args, ('--emsize', '--nhid', '--ntokens', '--steps'))
    device = cli.select_device(args)
    torch.manual_seed(0)
    model = RNNModel('LSTM', args.ntokens, args.emsize, args.nhid, 2).to(device).half()
    params = [p for p in model.parameters()]
    fake_grads = [torch.randn_like(p) * 1e-2 for p in params]

    def grads_to_model():
        for p, g in zip(params, fake_grads):
            p.grad = g.clone()

    nparams = sum(p.numel() for p in params)
    print(f'| {nparams / 1e6:.1f}M parameters in {len(params)} tensors on {device}', flush=True)
    optimizer = FP16_Optimizer(torch.optim.SGD(params, lr=1.0), static_loss_scale=128.0, verbose=False)

    def fused_update():
        optimizer.update_master_grads()
        optimizer.clip_master_grads(0.25)
        optimizer.step()

    reference = PerParameterSync(model, lr=1.0, loss_scale=128.0)
    # Alternate the two, twice, and keep the best time of each.
    ours, theirs = [], []
    for _ in range(2):
        ours.append(time_updates(fused_update, grads_to_model, args.steps, device))
        theirs.append(time_updates(lambda: reference.update(0.25), grads_to_model, args.steps, device))
        print(f'| FP16_Optimizer {ours[-1]:8.2f} ms/update | per-parameter sync {theirs[-1]:8.2f} ms/update', flush=True)
    print(f'| best: FP16_Optimizer {min(ours):.2f} ms, per-parameter sync {min(theirs):.2f} ms, '
          f'speed-up {min(theirs) / min(ours):.2f}x')
    return 0


if __name__ == '__main__':
    sys.exit(cli.guarded_main(main, prog=PROG))
