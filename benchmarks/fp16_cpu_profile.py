"""Where the time of a manual-fp16 training step goes on the CPU, beside fp32: one step of each,
profiled with torch.profiler (the issue's 128-unit, 2-layer LSTM, WikiText-2's vocabulary,
batch 24, bptt 35, one thread). Run from the repository root:

    python3 -m benchmarks.fp16_cpu_profile
    python3 -m benchmarks.fp16_cpu_profile --nhid 200 --rows 12

On a CPU without fp16 arithmetic (AMD Zen 4) nearly all of the fp16 step is aten::mm and
aten::addmm: fp16 matrix products there have no BLAS kernel to go to. The third step is
profiled after cpu_fp16_matmul.use_fp32_products(), which the scripts use on such a CPU.
"""
import sys
import time

import torch

import main as manual_fp16
import recipes
import training
from benchmarks import cpu_model
from model import RNNModel
from plumbing import cli, cpu_fp16_matmul

PROG = 'python3 -m benchmarks.fp16_cpu_profile'


def profile_step(recipe_name, args):
    """Seconds of one step after a warm-up step, and the profiler's table of it."""
    torch.manual_seed(args.seed)
    model = RNNModel('LSTM', args.ntokens, args.nhid, args.nhid, 2, dropout=0.2)
    if recipe_name.startswith('fp16 manual'):
        recipe = manual_fp16.ManualFP16Recipe(model, 20.0, 0.25, 128.0)
    else:
        recipe = recipes.AutocastRecipe(model, 20.0, 0.25)
    inputs = torch.randint(args.ntokens, (args.bptt, args.batch_size))
    targets = torch.randint(args.ntokens, (args.bptt * args.batch_size,))
    hidden = model.init_hidden(args.batch_size)
    training.train_batch(model, recipe, inputs, targets, hidden)
    with torch.profiler.profile() as profile:
        start = time.perf_counter()
        training.train_batch(model, recipe, inputs, targets, hidden)
        seconds = time.perf_counter() - start
    return seconds, profile.key_averages().table(sort_by='self_cpu_time_total', row_limit=args.rows,
                                                 max_name_column_width=40)


def main(argv=None):
    p = cli.ArgumentParser(prog=PROG, description='Profile one manual-fp16 training step on the CPU beside one fp32 step.')
    p.add_argument('--nhid', type=int, default=128, help='LSTM and embedding width')
    p.add_argument('--ntokens', type=int, default=33280, help="vocabulary size (WikiText-2's, padded to 8)")
    p.add_argument('--batch_size', type=int, default=24)
    p.add_argument('--bptt', type=int, default=35)
    p.add_argument('--rows', type=int, default=8, help='operators shown per table')
    p.add_argument('--seed', type=int, default=1111)
    args = p.parse_args(argv)
    cli.check_at_least_1(args, ('--nhid', '--ntokens', '--batch_size', '--bptt', '--rows'))
    torch.set_num_threads(1)
    print(f'| {cpu_model()} | torch {torch.__version__} | 1 thread | LSTM {args.nhid} x 2 layers, vocabulary '
          f'{args.ntokens}, batch {args.batch_size}, bptt {args.bptt}')
    times = {}
    for recipe_name in ('fp32', 'fp16 manual', 'fp16 manual, fp32 products'):
        if recipe_name.endswith('fp32 products'):
            cpu_fp16_matmul.use_fp32_products()  # for the rest of the process
        times[recipe_name], table = profile_step(recipe_name, args)
        print(f'== {recipe_name}: {times[recipe_name] * 1000:.0f} ms a step')
        print(table)
    for recipe_name in ('fp16 manual', 'fp16 manual, fp32 products'):
        print(f'| {recipe_name} / fp32: {times[recipe_name] / times["fp32"]:.2f}x')


if __name__ == '__main__':
    sys.exit(cli.guarded_main(main, prog=PROG))
