"""What a training process does before the lesson's setup: join torchrun's other ranks, choose the
device, switch on the CPU's fp16 fix, fetch WikiText-2; and the checks of the data and model sizes."""
import os

from plumbing import cpu_fp16_matmul, distributed, wikitext
from plumbing.cli import check_model_size, select_device, uses_default_data
from plumbing.errors import DataError, UsageError


def start(args):
    """(world, device): this process's place among torchrun's ranks (rank 0 of 1 without torchrun), its device."""
    world = distributed.World()
    if args.batch_size % world.size:
        raise UsageError(f'--batch_size {args.batch_size} cannot be split evenly over {world.size} '
                         f'processes; give a multiple of {world.size}.')
    device = select_device(args, world)
    world.start(device)
    # A CPU speed fix; the recipes' math is unchanged.
    cpu_fp16_matmul.prepare(args, device)
    if uses_default_data(args.data):
        # One download per machine.
        if world.local_rank == 0:
            wikitext.download_wikitext2(args.data)
        world.barrier()
    return world, device


def check_sizes(args, corpus, device, eval_batch_size):
    """Each column of a batchified split needs 2 tokens at least (one input, one target), and the model's
    fp32 weights must fit in the device's memory."""
    path = lambda split: os.path.join(args.data, f'{split}.txt')
    ntrain = len(corpus.train)
    if ntrain // args.batch_size < 2:
        raise UsageError(f'--batch_size {args.batch_size} is too large for {path("train")} ({ntrain} tokens): '
                         f'each of the {args.batch_size} columns needs at least 2 tokens.')
    for split in ('valid', 'test'):
        n = len(getattr(corpus, split))
        if n // eval_batch_size < 2:
            raise DataError(f'{path(split)} has {n} tokens, too few for evaluation in {eval_batch_size} '
                            f'columns (it needs {2 * eval_batch_size}).')
    check_model_size(args, len(corpus.dictionary), device)
