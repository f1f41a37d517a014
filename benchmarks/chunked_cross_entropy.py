"""Is the chunked cross-entropy worth keeping? Time the bf16 training step on the CPU with the
loss training.train_batch uses (training.cross_entropy: chunked for low-precision logits on the
CPU) against the same step with the plain loss, F.cross_entropy(logits.float(), targets); fp32
runs beside them for reference. Run from the repository root:

    python3 -m benchmarks.chunked_cross_entropy                # the --small config: LSTM 200/200, batch 20
    python3 -m benchmarks.chunked_cross_entropy --rounds 10

All variants run in one process, side by side: every round runs each variant's few warm-up
steps and then its timed steps, in turn, the order reversed every other round, so that a busy
machine slows all of them alike. Each variant trains its own model (same seed) through the real
training.train_batch; only the loss function differs. Prints ms/step, min and median over rounds.
"""
import contextlib
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import data
import recipes
import training
from benchmarks import cpu_model
from model import RNNModel
from plumbing import cli
from plumbing.errors import UsageError

PROG = 'python3 -m benchmarks.chunked_cross_entropy'


def plain_cross_entropy(logits, targets):
    """The loss without the CPU special case: all logits upcast to fp32 at once."""
    return F.cross_entropy(logits.float(), targets)


# variant -> (autocast dtype, loss function used inside training.train_batch)
VARIANTS = {
    'bf16 chunked': (torch.bfloat16, training.cross_entropy),
    'bf16 plain': (torch.bfloat16, plain_cross_entropy),
    'fp32': (None, training.cross_entropy),
}


@contextlib.contextmanager
def loss_function(fn):
    """training.train_batch computes its loss with training.cross_entropy: swap it for fn."""
    original = training.cross_entropy
    training.cross_entropy = fn
    try:
        yield
    finally:
        training.cross_entropy = original


class Variant:
    """One model, its recipe and its hidden state, trained step after step on the same batches."""

    def __init__(self, name, cfg, train_data):
        dtype, self.loss = VARIANTS[name]
        torch.manual_seed(cfg.seed)
        self.model = RNNModel('LSTM', cfg.ntokens, cfg.emsize, cfg.nhid, 2, cfg.dropout)
        self.model.train()
        self.recipe = recipes.AutocastRecipe(self.model, cfg.lr, cfg.clip, dtype)
        self.hidden = self.model.init_hidden(cfg.batch_size)
        self.train_data, self.bptt, self.batch = train_data, cfg.bptt, 0
        self.nbatch = (train_data.size(0) - 1) // cfg.bptt

    def steps(self, n):
        with loss_function(self.loss):
            for _ in range(n):
                inputs, targets = data.get_batch(self.train_data, (self.batch % self.nbatch) * self.bptt, self.bptt)
                _, self.hidden, _ = training.train_batch(self.model, self.recipe, inputs, targets, self.hidden)
                self.batch += 1

    def time_steps(self, warmup, n):
        """Milliseconds per step over n steps, after warmup untimed ones."""
        self.steps(warmup)
        start = time.perf_counter()
        self.steps(n)
        return 1000 * (time.perf_counter() - start) / n


def main(argv=None):
    p = cli.ArgumentParser(prog=PROG, description='Time the bf16 training step on the CPU with the chunked '
                                                  'cross-entropy against the plain one.')
    p.add_argument('--emsize', type=int, default=200, help='word embedding width')
    p.add_argument('--nhid', type=int, default=200, help='hidden state width of each of the 2 LSTM layers')
    p.add_argument('--batch_size', type=int, default=20)
    p.add_argument('--bptt', type=int, default=35)
    p.add_argument('--ntokens', type=int, default=33280, help='vocabulary size (synthetic tokens)')
    p.add_argument('--rounds', type=int, default=6, help='rounds; each runs every variant once')
    p.add_argument('--steps', type=int, default=10, help='timed steps of each variant per round')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps of each variant before its timed ones')
    p.add_argument('--threads', type=int, default=None, help="torch's intra-op threads (default: torch's choice)")
    args = p.parse_args(argv)
    cli.check_at_least_1(args, ('--emsize', '--nhid', '--batch_size', '--bptt', '--ntokens', '--rounds', '--steps',
                                '--threads'))
    if args.warmup < 0:
        raise UsageError(f'--warmup must not be negative (got {args.warmup}).')
    args.dropout, args.lr, args.clip, args.seed = 0.65, 20.0, 0.25, 1111  # as benchmarks.recipes
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f'| {cpu_model()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, torch {torch.__version__}')
    print(f'| LSTM {args.emsize}/{args.nhid}, batch {args.batch_size}, bptt {args.bptt}, vocab {args.ntokens}; '
          f'{args.rounds} rounds of {args.warmup} warm-up + {args.steps} timed steps per variant', flush=True)
    ntokens = (args.steps * args.bptt + 1) * args.batch_size * 2
    tokens = torch.randint(args.ntokens, (ntokens,), generator=torch.Generator().manual_seed(args.seed))
    train_data = data.batchify(tokens, args.batch_size)
    variants = {name: Variant(name, args, train_data) for name in VARIANTS}
    times = {name: [] for name in VARIANTS}
    for round_ in range(1, args.rounds + 1):
        order = list(VARIANTS) if round_ % 2 else list(VARIANTS)[::-1]
        for name in order:
            times[name].append(variants[name].time_steps(args.warmup, args.steps))
        print(f'| round {round_}/{args.rounds} | ' + ' | '.join(f'{n} {times[n][-1]:7.1f}' for n in VARIANTS)
              + ' ms/step', flush=True)
    print(f'\n{"variant":14s} {"min ms/step":>12s} {"median":>8s}')
    for name in VARIANTS:
        print(f'{name:14s} {min(times[name]):12.1f} {statistics.median(times[name]):8.1f}')
    for stat, f in (('min', min), ('median', statistics.median)):
        chunked, plain, fp32 = (f(times[n]) for n in ('bf16 chunked', 'bf16 plain', 'fp32'))
        print(f'| {stat}: the plain loss makes the bf16 step {100 * (plain / chunked - 1):+.1f}% longer; '
              f'bf16 against fp32: {fp32 / chunked:.2f}x as fast chunked, {fp32 / plain:.2f}x plain')
    return 0


if __name__ == '__main__':
    sys.exit(cli.guarded_main(main, prog=PROG))
