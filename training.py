"""The training loop every recipe shares, in the order the data flows:

    set up (data, model) -> train an epoch -> evaluate on valid -> keep the best model
        -> anneal the learning rate -> ... next epoch ... -> test the best model

The recipe (recipes.py) decides how each update is made: fp32, --amp, --bf16 there, the
classic fp16 recipes in main.py and main_fp16_optimizer.py. The run's bookkeeping (the lock on
--save, Ctrl-C, the progress line, the metrics file, --resume, torchrun) sits behind one
object, the Session (plumbing/session.py): the loop talks to it in a few calls.
"""
import math
import time

import torch
import torch.nn.functional as F

import data
from model import build_model, repackage_hidden
from plumbing import startup
from plumbing.chunked_cross_entropy import chunked_cross_entropy
from plumbing.errors import TrainingDiverged
from plumbing.metrics import ppl
from plumbing.session import Session, reported

EVAL_BATCH_SIZE = 10


class Setup:
    """Everything set up from the flags: the device, the data (batchified, on the device), the model;
    under torchrun, this process's place among the others (world)."""

    def __init__(self, args):
        self.args = args
        self.world, self.device = startup.start(args)
        # The same seed on every rank: the same initial model.
        torch.manual_seed(args.seed)
        # The dictionary is padded to a multiple of 8 so the decoder's GEMM can use Tensor Cores.
        self.corpus = data.Corpus(args.data, pad_to_multiple_of=8)
        self.ntokens = len(self.corpus.dictionary)
        startup.check_sizes(args, self.corpus, self.device, EVAL_BATCH_SIZE)
        # Under torchrun each rank trains its share of the columns (plumbing/distributed.py draws it).
        self.train_data = data.batchify(self.corpus.train, args.batch_size)[:, self.world.columns(args.batch_size)]
        self.train_data = self.train_data.contiguous().to(self.device)
        # The first row of each batch.
        self.batch_starts = range(0, self.train_data.size(0) - 1, args.bptt)
        if args.dry_run:
            # An epoch of one batch: checks the code, not the model's quality.
            self.batch_starts = self.batch_starts[:1]
        self.val_data = data.batchify(self.corpus.valid, EVAL_BATCH_SIZE).to(self.device)
        self.test_data = data.batchify(self.corpus.test, EVAL_BATCH_SIZE).to(self.device)
        self.model = build_model(args.model, self.ntokens, args.emsize, args.nhid, args.nlayers, args.dropout,
                                 args.tied, args.nhead).to(self.device)
        if self.world.size > 1:
            # Each rank drops out other units.
            torch.manual_seed((args.seed + self.world.rank) % 2 ** 64)
        if args.fp16 and self.device.type == 'cuda' and (args.emsize % 8 or args.nhid % 8 or args.batch_size % 8):
            print(f'Warning: emsize = {args.emsize}, nhid = {args.nhid}, batch_size = {args.batch_size} '
                  "should all be multiples of 8 to ensure Tensor Core use for the RNN's GEMMs.")


# ---------------------------------------------------------------- the epochs, best model, annealing, test

def train(setup, recipe):
    """Train epoch after epoch, keep the best model, anneal the learning rate; then test.

    Returns the exit code: 128 + signum after SIGTERM or SIGHUP, else 0.
    """
    args, model = setup.args, setup.model
    with Session(setup, recipe) as session:
        progress = session.progress
        while progress.epoch <= args.epochs and not session.stopped:
            epoch_start = time.time()
            if not train_epoch(setup, recipe, progress, session):
                break
            # Every rank evaluates the whole split; rank 0's result decides for all.
            val_loss = session.rank0_value(evaluate(model, setup.val_data, args.bptt, recipe.autocast, args.dry_run))
            if not math.isfinite(val_loss):
                raise TrainingDiverged()
            print('-' * 89)
            print(f'| end of epoch {progress.epoch:3d} | time: {time.time() - epoch_start:5.2f}s '
                  f'| valid loss {val_loss:5.2f} | valid ppl {ppl(val_loss):8.2f}')
            print('-' * 89, flush=True)
            if progress.best_val_loss is None or val_loss < progress.best_val_loss:
                progress.best_val_loss = val_loss
                session.save_best_model(val_loss)
            else:
                anneal(recipe.optimizer)
            session.end_epoch(val_loss, time.time() - epoch_start)
        session.after_training()
        # The best model is rank 0's file: rank 0 alone tests it.
        if setup.world.is_main:
            test_loss = evaluate(session.best_model(), setup.test_data, args.bptt, recipe.autocast, args.dry_run)
            print('=' * 89)
            print(f'| End of training | test loss {test_loss:5.2f} | test ppl {ppl(test_loss):8.2f}')
            print('=' * 89, flush=True)
            session.finish(test_loss)
    return session.exit_code


def anneal(optimizer):
    """No improvement on validation: divide the learning rate by 4."""
    for group in optimizer.param_groups:
        group['lr'] /= 4.0


# ---------------------------------------------------------------- train an epoch

def train_epoch(setup, recipe, progress, session):
    """Train from progress.next_batch to the end of the epoch; returns False if a stop ended it first."""
    args, model = setup.args, setup.model
    model.train()
    hidden = progress.hidden if progress.hidden is not None else model.init_hidden(setup.train_data.size(1))
    for batch in range(progress.next_batch, len(setup.batch_starts)):
        inputs, targets = data.get_batch(setup.train_data, setup.batch_starts[batch], args.bptt)
        loss, hidden, updated = train_batch(session.parallel_model, recipe, inputs, targets, hidden, setup.world.size)
        progress.next_batch = batch + 1
        # Counts a skipped update; prints a progress line every --log-interval batches.
        session.after_batch(loss, targets.numel(), updated)
        if session.stop_agreed():
            # SAVE.resume keeps the state, without the graph of the last batch.
            progress.hidden = repackage_hidden(hidden)
            return progress.next_batch == len(setup.batch_starts)
    return True


def train_batch(model, recipe, inputs, targets, hidden, ranks=1):
    """One forward, backward and update; returns the (unscaled) loss, the new hidden state
    and whether the update was made."""
    # Detach the hidden state so backprop stops at the start of this batch
    # instead of running back to the beginning of the data set.
    hidden = repackage_hidden(hidden)
    with recipe.autocast():
        output, hidden = model(inputs, hidden)
        loss = cross_entropy(output.view(-1, output.size(-1)), targets)
    # Under torchrun each of the ranks backpropagates its share of the mean over all columns;
    # their gradients are summed (plumbing/distributed.py).
    updated = recipe.step(loss / ranks if ranks > 1 else loss)
    return loss.detach(), hidden, updated


def cross_entropy(logits, targets):
    """Mean cross-entropy, computed in fp32."""
    if logits.dtype != torch.float32 and logits.device.type == 'cpu':
        # CPU only: upcasting all logits costs as much as the decoder.
        return chunked_cross_entropy(logits, targets)
    return F.cross_entropy(logits.float(), targets)


# ---------------------------------------------------------------- evaluate

def evaluate(model, source, bptt, autocast, one_batch=False):
    """Mean cross-entropy per token over source (its first batch only if one_batch), accumulated in fp32."""
    if one_batch:
        # The first batch's inputs, and its targets one row further.
        source = source[:bptt + 1]
    model.eval()
    total = torch.zeros((), device=source.device)
    hidden = model.init_hidden(source.size(1))
    with torch.no_grad():
        # A line every 10 s says how long is left, where evaluation takes long.
        for i in reported(range(0, source.size(0) - 1, bptt), 'evaluating'):
            inputs, targets = data.get_batch(source, i, bptt)
            with autocast():
                output, hidden = model(inputs, hidden)
            total += len(inputs) * F.cross_entropy(output.view(-1, output.size(-1)).float(), targets)
    return total.item() / (source.size(0) - 1)
