"""The training loop every recipe shares, in the order the data flows:

    set up (data, model) -> train an epoch -> evaluate on valid -> keep the best model
        -> anneal the learning rate -> ... next epoch ... -> test the best model

The recipe (recipes.py) decides how each update is made: fp32, --amp, --bf16 here,
the classic fp16 recipes in main.py and main_fp16_optimizer.py.
"""
import contextlib
import dataclasses
import math
import os
import time

import torch
import torch.nn.functional as F

import checkpoint
import cpu_fp16_matmul
import data
import distributed
import onnx_export
from chunked_cross_entropy import chunked_cross_entropy
from cli import StopRequest, UsageError, check_model_size, select_device, uses_default_data
from metrics import MetricsFile, run_record
from model import build_model, repackage_hidden
from recipes import TrainingDiverged

EVAL_BATCH_SIZE = 10


# ---------------------------------------------------------------- set up

class Run:
    """Everything set up from the flags: device, data (batchified, on the device), model;
    under torchrun, this process's rank among the others (distributed.py)."""

    def __init__(self, args):
        self.args = args
        self.world = distributed.World()  # rank 0 of 1, unless torchrun started this process
        if args.batch_size % self.world.size:
            raise UsageError(f'--batch_size {args.batch_size} cannot be split evenly over {self.world.size} '
                             f'processes; give a multiple of {self.world.size}.')
        torch.manual_seed(args.seed)  # the same on every rank: the same initial model
        self.device = select_device(args, self.world)
        self.world.start(self.device)
        cpu_fp16_matmul.prepare(args, self.device)  # a CPU speed fix; the recipes' math is unchanged
        if uses_default_data(args.data):
            if self.world.local_rank == 0:  # one download per machine
                data.download_wikitext2(args.data)
            self.world.barrier()
        # The dictionary is padded to a multiple of 8 so the decoder's GEMM can use Tensor Cores.
        self.corpus = data.Corpus(args.data, pad_to_multiple_of=8)
        self.ntokens = len(self.corpus.dictionary)
        self.check_split_sizes()
        new_model = lambda: build_model(args.model, self.ntokens, args.emsize, args.nhid, args.nlayers,
                                        args.dropout, args.tied, args.nhead)
        check_model_size(new_model, args, self.device)
        # Under torchrun each rank trains its share of the columns (distributed.py draws it).
        self.train_data = data.batchify(self.corpus.train, args.batch_size)[:, self.world.columns(args.batch_size)]
        self.train_data = self.train_data.contiguous().to(self.device)
        self.batch_starts = range(0, self.train_data.size(0) - 1, args.bptt)  # first row of each batch
        if args.dry_run:
            self.batch_starts = self.batch_starts[:1]  # an epoch of one batch: checks the code, not the model's quality
        self.val_data = data.batchify(self.corpus.valid, EVAL_BATCH_SIZE).to(self.device)
        self.test_data = data.batchify(self.corpus.test, EVAL_BATCH_SIZE).to(self.device)
        self.model = new_model().to(self.device)
        if self.world.size > 1:
            torch.manual_seed((args.seed + self.world.rank) % 2 ** 64)  # each rank drops out other units
        if args.fp16 and (args.emsize % 8 or args.nhid % 8 or args.batch_size % 8):
            print(f'Warning: emsize = {args.emsize}, nhid = {args.nhid}, batch_size = {args.batch_size} '
                  "should all be multiples of 8 to ensure Tensor Core use for the RNN's GEMMs.")

    def check_split_sizes(self):
        """Each column of a batchified split needs 2 tokens at least: one input, one target."""
        path = lambda split: os.path.join(self.args.data, f'{split}.txt')
        ntrain = len(self.corpus.train)
        if ntrain // self.args.batch_size < 2:
            raise UsageError(f'--batch_size {self.args.batch_size} is too large for {path("train")} ({ntrain} tokens): '
                             f'each of the {self.args.batch_size} columns needs at least 2 tokens.')
        for split in ('valid', 'test'):
            n = len(getattr(self.corpus, split))
            if n // EVAL_BATCH_SIZE < 2:
                raise data.DataError(f'{path(split)} has {n} tokens, too few for evaluation in {EVAL_BATCH_SIZE} '
                                     f'columns (it needs {2 * EVAL_BATCH_SIZE}).')


@dataclasses.dataclass
class Progress:
    """Where the run is: what SAVE.resume records so that --resume continues exactly,
    down to the progress line that was being summed when the run stopped."""
    epoch: int = 1
    next_batch: int = 0          # the batch of the epoch to train next
    hidden: object = None        # the RNN state carried into next_batch (always None for the Transformer)
    best_val_loss: float = None
    skipped: int = 0             # updates skipped for non-finite gradients, over the whole run
    epoch_skipped: int = 0       # ... and in this epoch
    line_start: int = 0          # the first batch of the next progress line
    line_loss: float = 0.0       # summed loss, tokens and seconds of batches line_start .. next_batch - 1
    line_tokens: int = 0
    line_seconds: float = 0.0
    elapsed: float = 0.0         # seconds since the run started (SAVE.metrics.jsonl's clock)
    metrics_bytes: int = 0       # the length of SAVE.metrics.jsonl

    def next_epoch(self):
        return Progress(epoch=self.epoch + 1, best_val_loss=self.best_val_loss, skipped=self.skipped)


# ---------------------------------------------------------------- train an epoch

def cross_entropy(logits, targets):
    """Mean cross-entropy, computed in fp32."""
    if logits.dtype != torch.float32 and logits.device.type == 'cpu':
        return chunked_cross_entropy(logits, targets)  # CPU only: upcasting all logits costs as much as the decoder
    return F.cross_entropy(logits.float(), targets)


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
    # their gradients are summed (distributed.py).
    updated = recipe.step(loss / ranks if ranks > 1 else loss)
    return loss.detach(), hidden, updated


def learning_rate(recipe):
    return recipe.optimizer.param_groups[0]['lr']


def train_epoch(run, recipe, progress, stop, metrics):
    """Train from progress.next_batch to the end of the epoch, or until a stop is requested (then
    return True); each progress line is printed and written to metrics."""
    args, model, world = run.args, run.model, run.world
    model.train()
    hidden = progress.hidden if progress.hidden is not None else model.init_hidden(run.train_data.size(1))
    starts = run.batch_starts
    line_loss = torch.tensor(progress.line_loss, device=run.device)  # summed on the device: no host sync per batch
    first_batch = progress.next_batch
    epoch_start = line_clock = time.time()
    for batch in range(first_batch, len(starts)):
        inputs, targets = data.get_batch(run.train_data, starts[batch], args.bptt)
        loss, hidden, updated = train_batch(run.parallel_model, recipe, inputs, targets, hidden, world.size)
        if not updated:
            progress.skipped += 1
            progress.epoch_skipped += 1
            scale = '' if recipe.loss_scale is None else f', loss scale now {recipe.loss_scale:g}'
            print(f'| gradients are not finite: update skipped ({progress.skipped} so far{scale})', flush=True)
        line_loss += loss
        progress.line_tokens += targets.numel() * world.size  # every rank trains as many
        done = batch + 1
        progress.next_batch = done
        if done % args.log_interval == 0 or args.dry_run:  # a dry run shows its one batch
            batches = done - progress.line_start
            cur_loss = world.mean(line_loss).item() / batches
            seconds = progress.line_seconds + time.time() - line_clock
            eta = (time.time() - epoch_start) / (done - first_batch) * (len(starts) - done)
            ms_per_batch, tokens_per_s = seconds * 1000 / batches, progress.line_tokens / seconds
            loss_scale = recipe.loss_scale
            scale = '' if loss_scale is None else f' | loss scale {loss_scale:g}'
            print(f'| epoch {progress.epoch:3d} | {done:5d}/{len(starts):5d} batches | lr {learning_rate(recipe):.3g} '
                  f'| ms/batch {ms_per_batch:5.2f} | loss {cur_loss:5.2f} | ppl {ppl(cur_loss):8.2f} '
                  f'| tok/s {tokens_per_s:7.0f} | eta {eta:4.0f}s{scale} | skipped {progress.epoch_skipped}', flush=True)
            metrics.write('train', epoch=progress.epoch, batch=done, step=(progress.epoch - 1) * len(starts) + done,
                          lr=learning_rate(recipe), loss=cur_loss, ppl=ppl(cur_loss), ms_per_batch=ms_per_batch,
                          tokens_per_s=tokens_per_s, loss_scale=loss_scale, skipped=progress.skipped)
            line_loss.zero_()
            progress.line_start, progress.line_tokens, progress.line_seconds = done, 0, 0.0
            line_clock = time.time()
        # All ranks stop after the same batch. SAVE.resume keeps the state and the unfinished line,
        # so the resumed run prints it whole.
        if world.any(stop.requested):
            progress.hidden = repackage_hidden(hidden)  # without the graph of the last batch
            progress.line_loss = world.mean(line_loss).item()
            progress.line_seconds += time.time() - line_clock
            return True
    return False


def ppl(loss):
    return math.exp(loss) if loss < 700 else float('inf')


# ---------------------------------------------------------------- evaluate

def evaluate(model, source, bptt, autocast, one_batch=False):
    """Mean cross-entropy per token over source (its first batch only if one_batch), accumulated in fp32."""
    if one_batch:
        source = source[:bptt + 1]  # the first batch's inputs, and its targets one row further
    model.eval()
    total = torch.zeros((), device=source.device)
    hidden = model.init_hidden(source.size(1))
    with torch.no_grad():
        for i in range(0, source.size(0) - 1, bptt):
            inputs, targets = data.get_batch(source, i, bptt)
            with autocast():
                output, hidden = model(inputs, hidden)
            total += len(inputs) * F.cross_entropy(output.view(-1, output.size(-1)).float(), targets)
    return total.item() / (source.size(0) - 1)


# ---------------------------------------------------------------- the epochs, best model, annealing, test

def train(run, recipe):
    """Train epoch after epoch, keep the best model, anneal the learning rate; then test, and export with --onnx-export.

    After every epoch, and when a stop is requested, SAVE.resume records the run so that
    --resume continues it exactly. Returns the exit code (128 + signum after SIGTERM or SIGHUP, else 0).
    Under torchrun every rank runs this; rank 0 alone prints and writes files.
    """
    args, model, world = run.args, run.model, run.world
    resume_file = args.save + '.resume'
    # Under torchrun, DistributedDataParallel sums the gradients of all ranks during backward.
    run.parallel_model = world.wrap(model)

    def save_resume():
        progress.elapsed, progress.metrics_bytes = metrics.elapsed(), metrics.size()
        state = dataclasses.asdict(progress)
        state['hidden'] = world.gather_columns(progress.hidden)  # every rank's columns: the whole batch
        rng_states = world.gather(checkpoint.rng_state(run.device))
        if world.is_main:
            checkpoint.save_resume(resume_file, model, run.corpus.dictionary, args, recipe, state, rng_states)

    # One run per --save (a second is refused); Ctrl-C, SIGTERM or SIGHUP stops after the current batch.
    with checkpoint.SaveLock(args.save) if world.is_main else contextlib.nullcontext(), StopRequest() as stop:
        progress = resumed_progress(run, recipe) if args.resume else Progress()
        with MetricsFile(args.save + '.metrics.jsonl' if world.is_main else None,
                         progress.metrics_bytes if args.resume else None, progress.elapsed) as metrics:
            if metrics.note:
                print(f'| {metrics.note}', flush=True)
            metrics.write('run', **run_record(args, recipe, run.device, progress, len(run.batch_starts), world.size))
            optimizer = 'AdamW' if args.use_optimizer else 'SGD'  # recipes.optimizer's choice
            print(f'| device {run.device} | precision {recipe.describe()} | optimizer {optimizer} '
                  f'| vocabulary {run.ntokens} | train tokens {len(run.corpus.train)}', flush=True)
            if not world.alone:
                print(f'| torchrun: {world.size} processes, {args.batch_size // world.size} of the '
                      f'{args.batch_size} columns each', flush=True)
            if args.dry_run:
                print('| dry run: one batch of training and one batch of evaluation per epoch', flush=True)
            stopped = False
            try:
                while progress.epoch <= args.epochs and not stopped:
                    epoch_start = time.time()
                    stopped = train_epoch(run, recipe, progress, stop, metrics)
                    if progress.next_batch < len(run.batch_starts):
                        break  # stopped inside the epoch: SAVE.resume continues from next_batch
                    # Every rank evaluates the whole split; rank 0's result decides for all.
                    val_loss = world.from_main(
                        evaluate(model, run.val_data, args.bptt, recipe.autocast, one_batch=args.dry_run))
                    if not math.isfinite(val_loss):
                        raise TrainingDiverged()
                    print('-' * 89)
                    print(f'| end of epoch {progress.epoch:3d} | time: {time.time() - epoch_start:5.2f}s '
                          f'| valid loss {val_loss:5.2f} | valid ppl {ppl(val_loss):8.2f}')
                    print('-' * 89, flush=True)
                    if progress.best_val_loss is None or val_loss < progress.best_val_loss:
                        progress.best_val_loss = val_loss
                        if world.is_main:
                            best = checkpoint.model_checkpoint(model, run.corpus.dictionary, args, val_loss)
                            with stopping_if_lost(f'the epoch {progress.epoch} model (valid loss {val_loss:.2f}) is lost'):
                                checkpoint.save(best, args.save)
                    else:
                        # No improvement on validation: anneal the learning rate.
                        for group in recipe.optimizer.param_groups:
                            group['lr'] /= 4.0
                    metrics.write('epoch', epoch=progress.epoch, valid_loss=val_loss, valid_ppl=ppl(val_loss),
                                  epoch_seconds=time.time() - epoch_start, best=val_loss == progress.best_val_loss,
                                  lr=learning_rate(recipe), skipped=progress.skipped)
                    progress = progress.next_epoch()
                    with stopping_if_lost('--resume can continue only from an earlier SAVE.resume'):
                        save_resume()
                    stopped = world.any(stop.requested)  # a signal during evaluation or the save
            except TrainingDiverged:
                kept = (f'the best model so far is kept in {args.save}' if progress.best_val_loss is not None
                        else 'no model was saved')
                raise TrainingDiverged(
                    f'training diverged: the loss or the gradients became inf or NaN in epoch {progress.epoch} with lr '
                    f'{learning_rate(recipe):g} (try a smaller --lr); {kept}.') from None
            if stopped:
                if progress.next_batch:
                    lost = f'the {progress.next_batch} batches of epoch {progress.epoch} cannot be resumed'
                    with stopping_if_lost(lost):
                        save_resume()
                print('-' * 89)
                print(f'Exiting from training early at epoch {progress.epoch}, batch {progress.next_batch}; '
                      f'continue with --resume {resume_file}')
            if world.is_main:  # the best model is rank 0's file
                final_test(run, recipe, progress, metrics, stopped)
                if args.onnx_export:
                    export_best_model(args, progress)
    run.parallel_model = None  # DistributedDataParallel goes before the connections it uses
    world.close()
    return stop.exit_code


def resumed_progress(run, recipe):
    """Restore the run saved in --resume (model, recipe, this rank's random numbers); its progress."""
    args, world = run.args, run.world
    saved = checkpoint.load_resume(args.resume, run.model, run.corpus.dictionary, args, recipe,
                                   [f.name for f in dataclasses.fields(Progress)], len(run.batch_starts),
                                   world.rank, world.size)
    progress = Progress(**saved)
    progress.hidden = world.my_columns(progress.hidden, args.batch_size)
    print(f'| resuming {args.resume} at epoch {progress.epoch}, batch {progress.next_batch}', flush=True)
    return progress


@contextlib.contextmanager
def stopping_if_lost(what):
    """A save that fails stops the run with one sentence that says what was lost; files saved before stay whole."""
    try:
        yield
    except checkpoint.WriteError as e:
        raise checkpoint.WriteError(f'{e}; {what} (files saved before are unchanged).') from None


def final_test(run, recipe, progress, metrics, stopped):
    """Load the best model written so far; print its test loss and write it to metrics."""
    model = run.model
    if progress.best_val_loss is None:
        print('| no epoch finished, so there is no best model: testing the current weights')
    else:
        try:
            model.load_state_dict(checkpoint.load(run.args.save)['model'])
        except (checkpoint.CheckpointError, KeyError, RuntimeError) as e:
            print(f'| the best model cannot be loaded ({e}): testing the current weights')
    test_loss = evaluate(model, run.test_data, run.args.bptt, recipe.autocast, one_batch=run.args.dry_run)
    print('=' * 89)
    print(f'| End of training | test loss {test_loss:5.2f} | test ppl {ppl(test_loss):8.2f}')
    print('=' * 89, flush=True)
    metrics.write('end', test_loss=test_loss, test_ppl=ppl(test_loss), stopped=stopped, epoch=progress.epoch,
                  batch=progress.next_batch, best_val_loss=progress.best_val_loss, skipped=progress.skipped)


def export_best_model(args, progress):
    """--onnx-export: the best model, read back from --save, as ONNX (fp32, input [bptt, 1])."""
    if progress.best_val_loss is None:
        print(f'| no epoch finished, so there is no best model to export to {args.onnx_export}', flush=True)
        return
    onnx_export.export(args.save, args.onnx_export, args.bptt)
    print(f'| the best model is exported to ONNX in {args.onnx_export}', flush=True)
