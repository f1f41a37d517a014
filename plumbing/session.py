"""A training run's bookkeeping, behind the few calls the loop in training.py makes: the lock on
--save, stop signals, the progress line, SAVE.metrics.jsonl, SAVE.resume and --resume,
torchrun's agreement between ranks, the best-model file, and the exit code."""
import contextlib
import dataclasses
import time

import torch

from plumbing import checkpoint, onnx_export
from plumbing.cli import check_output_file
from plumbing.errors import TrainingDiverged, WriteError
from plumbing.files import SaveLock
from plumbing.metrics import MetricsFile, first_record, ppl
from plumbing.signals import StopRequest


@dataclasses.dataclass
class Progress:
    """Where the run is."""
    epoch: int = 1
    next_batch: int = 0          # the batch of the epoch to train next
    hidden: object = None        # the RNN state carried into next_batch (always None for the Transformer)
    best_val_loss: float = None
    skipped: int = 0             # updates skipped for non-finite gradients, over the whole run
    epoch_skipped: int = 0       # ... and in this epoch

    def start_next_epoch(self):
        self.epoch, self.next_batch, self.hidden, self.epoch_skipped = self.epoch + 1, 0, None, 0


@dataclasses.dataclass
class Line:
    """The progress line being summed: batches line_start .. next_batch - 1. SAVE.resume keeps it,
    so that a run resumed in the middle prints the line whole."""
    line_start: int = 0
    line_loss: float = 0.0
    line_tokens: int = 0
    line_seconds: float = 0.0


# A run that has printed no progress line this long into its first epoch says that it trains, and for how long.
FIRST_NEWS_S = 5


class Session:
    """Used as `with Session(setup, recipe) as session:` around the epochs (training.train).

    Entering takes the lock on --save (one run per --save), starts handling Ctrl-C, SIGTERM and
    SIGHUP (stop after the current batch), restores --resume or starts afresh, and opens the
    metrics file. Under torchrun every rank holds a Session; rank 0 alone prints and writes files.
    """

    def __init__(self, setup, recipe):
        self.setup, self.recipe, self.args, self.world = setup, recipe, setup.args, setup.world
        self.resume_file = self.args.save + '.resume'
        self.stopped = False
        self.shown_training = False
        self.exit_code = 0

    def __enter__(self):
        args, world = self.args, self.world
        self.files = contextlib.ExitStack()
        try:
            if world.is_main:
                # Every file the run writes, so that no two runs write one.
                others = [('SAVE.resume', self.resume_file), ('SAVE.metrics.jsonl', args.save + '.metrics.jsonl')]
                if args.onnx_export:
                    others.append(('--onnx-export', args.onnx_export))
                self.files.enter_context(SaveLock(args.save, others=others))
            self.stop = self.files.enter_context(StopRequest())
            if args.resume:
                self.progress, self.line, elapsed, metrics_bytes, metrics_sha256 = self.resumed()
            else:
                self.progress, self.line, elapsed, metrics_bytes, metrics_sha256 = Progress(), Line(), 0.0, None, None
            self.metrics = self.files.enter_context(MetricsFile(
                args.save + '.metrics.jsonl' if world.is_main else None, metrics_bytes, elapsed, metrics_sha256))
            self.start()
        except BaseException:
            self.files.close()
            raise
        return self

    def __exit__(self, kind, error, traceback):
        try:
            if kind is TrainingDiverged and not str(error):
                raise self.diverged() from None
        finally:
            self.files.close()
        if kind is None:
            self.exit_code = self.stop.exit_code
            # DistributedDataParallel goes before the connections it uses.
            self.parallel_model = None
            self.world.close()

    def start(self):
        args, setup, recipe, world = self.args, self.setup, self.recipe, self.world
        if self.metrics.note:
            print(f'| {self.metrics.note}', flush=True)
        self.metrics.write('run', **first_record(args, recipe, setup.device, self.progress, len(setup.batch_starts),
                                                 world.size))
        print(f'| device {setup.device} | precision {recipe.describe()} | optimizer {recipe.optimizer_name} '
              f'| vocabulary {setup.ntokens} | train tokens {len(setup.corpus.train)}', flush=True)
        if not world.alone:
            print(f'| torchrun: {world.size} processes, {args.batch_size // world.size} of the '
                  f'{args.batch_size} columns each', flush=True)
        if args.dry_run:
            print('| dry run: one batch of training and one batch of evaluation per epoch', flush=True)
        # Under torchrun, DistributedDataParallel sums the gradients of all ranks during backward.
        self.parallel_model = world.wrap(setup.model)
        self.start_line()

    # ------------------------------------------------------------ during an epoch

    def start_line(self):
        """A new progress line (or the saved one, continued): its loss is summed on the device, without a host sync."""
        self.line_loss = torch.tensor(self.line.line_loss, device=self.setup.device)
        self.line_clock = self.epoch_clock = time.time()
        self.epoch_first_batch = self.progress.next_batch
        self.first_batch_done = None

    def after_batch(self, loss, ntokens, updated):
        """Count a skipped update, add the batch to the progress line, print the line every --log-interval batches."""
        progress, line, world = self.progress, self.line, self.world
        if not updated:
            progress.skipped += 1
            progress.epoch_skipped += 1
            scale = '' if self.recipe.loss_scale is None else f', loss scale now {self.recipe.loss_scale:g}'
            print(f'| gradients are not finite: update skipped ({progress.skipped} so far{scale})', flush=True)
            self.check_skipped(loss)
        self.line_loss += loss
        line.line_tokens += ntokens * world.size  # every rank trains as many
        done = progress.next_batch
        if done % self.args.log_interval == 0 or self.args.dry_run:  # a dry run shows its one batch
            self.print_line(done)
        elif not self.shown_training:
            self.first_news(done)

    def first_news(self, done):
        """Before the first progress line: once FIRST_NEWS_S into the run, say that it trains and how long an epoch
        will take, from the batches after the first (which also warms up)."""
        if self.first_batch_done is not None and time.time() - self.epoch_clock < FIRST_NEWS_S:
            return
        if self.setup.device.type != 'cpu':
            # The batches queued on the device finish first: the time is theirs.
            torch.accelerator.synchronize()
        now = time.time()
        if self.first_batch_done is None:
            self.first_batch_done = now
            return
        self.shown_training = True
        nbatches, batches = len(self.setup.batch_starts), done - self.epoch_first_batch
        epoch = (now - self.first_batch_done) / (batches - 1) * nbatches
        print(f'| training: {batches} batches in {now - self.epoch_clock:.1f}s, so about {epoch:.0f}s an epoch '
              f'of {nbatches} batches; a progress line every {self.args.log_interval} batches', flush=True)

    def check_skipped(self, loss):
        """A skipped update is a loss scale's business only while the loss itself is finite, and while some update
        of the epoch is made: a non-finite loss, or an epoch whose every update was skipped, stops the run as
        diverged, before the untrained model could be saved as the best."""
        progress, nbatches = self.progress, len(self.setup.batch_starts)
        if self.world.any(not bool(torch.isfinite(loss))):
            raise self.diverged('the loss itself became inf or NaN, which no loss scale can make finite')
        if progress.next_batch == nbatches and progress.epoch_skipped == nbatches:
            scale = '' if self.recipe.loss_scale is None else f' (loss scale now {self.recipe.loss_scale:g})'
            raise self.diverged(f'all {nbatches} updates of the epoch were skipped for non-finite gradients{scale}, '
                                'so the model did not train; a smaller --static-loss-scale or --lr may help')

    def print_line(self, done):
        progress, line, recipe = self.progress, self.line, self.recipe
        nbatches = len(self.setup.batch_starts)
        batches = done - line.line_start
        loss = self.world.mean(self.line_loss).item() / batches
        seconds = line.line_seconds + time.time() - self.line_clock
        eta = (time.time() - self.epoch_clock) / (done - self.epoch_first_batch) * (nbatches - done)
        ms_per_batch, tokens_per_s = seconds * 1000 / batches, line.line_tokens / seconds
        lr, loss_scale = recipe.optimizer.param_groups[0]['lr'], recipe.loss_scale
        scale = '' if loss_scale is None else f' | loss scale {loss_scale:g}'
        print(f'| epoch {progress.epoch:3d} | {done:5d}/{nbatches:5d} batches | lr {lr:.3g} '
              f'| ms/batch {ms_per_batch:5.2f} | loss {loss:5.2f} | ppl {ppl(loss):8.2f} '
              f'| tok/s {tokens_per_s:7.0f} | eta {eta:4.0f}s{scale} | skipped {progress.epoch_skipped}', flush=True)
        self.metrics.write('train', epoch=progress.epoch, batch=done, step=(progress.epoch - 1) * nbatches + done,
                           lr=lr, loss=loss, ppl=ppl(loss), ms_per_batch=ms_per_batch, tokens_per_s=tokens_per_s,
                           loss_scale=loss_scale, skipped=progress.skipped)
        self.line_loss.zero_()
        self.line = Line(line_start=done)
        self.line_clock = time.time()
        self.shown_training = True

    def stop_agreed(self):
        """Whether a stop was requested (on any rank: all stop after the same batch). If so, the
        unfinished progress line is kept for SAVE.resume."""
        if not self.world.any(self.stop.requested):
            return False
        self.stopped = True
        self.line.line_loss = self.world.mean(self.line_loss).item()
        self.line.line_seconds += time.time() - self.line_clock
        return True

    # ------------------------------------------------------------ between epochs

    def rank0_value(self, value):
        """Rank 0's value on every rank (value itself without torchrun), so that all ranks decide alike."""
        return self.world.from_main(value)

    def save_best_model(self, val_loss):
        if self.world.is_main:
            best = checkpoint.model_checkpoint(self.setup.model, self.setup.corpus.dictionary, self.args, val_loss)
            with stopping_if_lost(f'the epoch {self.progress.epoch} model (valid loss {val_loss:.2f}) is lost'):
                checkpoint.save(best, self.args.save)

    def end_epoch(self, val_loss, epoch_seconds):
        """The epoch's metrics record; then SAVE.resume for the start of the next epoch."""
        progress, recipe = self.progress, self.recipe
        self.metrics.write('epoch', epoch=progress.epoch, valid_loss=val_loss, valid_ppl=ppl(val_loss),
                           epoch_seconds=epoch_seconds, best=val_loss == progress.best_val_loss,
                           lr=recipe.optimizer.param_groups[0]['lr'], skipped=progress.skipped)
        progress.start_next_epoch()
        self.line = Line()
        # A dry run has nothing to resume: its epochs are one batch.
        if not self.args.dry_run:
            with stopping_if_lost('--resume can continue only from an earlier SAVE.resume'):
                self.save_resume()
        # A signal during evaluation or the save.
        self.stopped = self.world.any(self.stop.requested)
        self.start_line()

    # ------------------------------------------------------------ after the epochs

    def after_training(self):
        """After a stop: SAVE.resume for the batch reached, and the line that says how to continue."""
        if not self.stopped:
            return
        if self.progress.next_batch and not self.args.dry_run:
            lost = f'the {self.progress.next_batch} batches of epoch {self.progress.epoch} cannot be resumed'
            with stopping_if_lost(lost):
                self.save_resume()
        print('-' * 89)
        print(f'Exiting from training early at epoch {self.progress.epoch}, batch {self.progress.next_batch}; '
              f'continue with --resume {self.resume_file}')
        if self.world.is_main:
            print('| testing the best model on the test set; Ctrl-C again skips the test and exits at once', flush=True)

    def best_model(self):
        """The model with the best weights written so far, read back from --save (or the current ones, saying why)."""
        model = self.setup.model
        if self.progress.best_val_loss is None:
            print('| no epoch finished, so there is no best model: testing the current weights')
            return model
        try:
            best = checkpoint.load(self.args.save)
            # --save may hold another run's model (a resume with another --save): this run's has its validation loss.
            if best.get('best_val_loss') != self.progress.best_val_loss:
                raise checkpoint.CheckpointError(f'{self.args.save} holds another run\'s model, not the one of '
                                                 f'valid loss {self.progress.best_val_loss:.2f}')
            model.load_state_dict(best['model'])
        except (checkpoint.CheckpointError, KeyError, RuntimeError) as e:
            print(f'| the best model cannot be loaded ({e}): testing the current weights')
        return model

    def finish(self, test_loss):
        """The metrics file's last record; then --onnx-export."""
        progress = self.progress
        self.metrics.write('end', test_loss=test_loss, test_ppl=ppl(test_loss), stopped=self.stopped,
                           epoch=progress.epoch, batch=progress.next_batch, best_val_loss=progress.best_val_loss,
                           skipped=progress.skipped)
        if self.args.onnx_export:
            export_best_model(self.args, progress)

    # ------------------------------------------------------------ SAVE.resume

    def save_resume(self):
        """SAVE.resume: the model, the recipe's state, Progress and Line, the clock and the metrics file's length,
        and the random number generators of every rank."""
        setup, world = self.setup, self.world
        state = {**dataclasses.asdict(self.progress), **dataclasses.asdict(self.line),
                 'elapsed': self.metrics.elapsed(), 'metrics_bytes': self.metrics.size(),
                 'metrics_sha256': self.metrics.digest()}
        state['hidden'] = world.gather_columns(self.progress.hidden)  # every rank's columns: the whole batch
        rng_states = world.gather(checkpoint.rng_state(setup.device))
        if world.is_main:
            checkpoint.save_resume(self.resume_file, setup.model, setup.corpus.dictionary, self.args, self.recipe,
                                   state, rng_states)

    def resumed(self):
        """Restore the run saved in --resume (model, recipe, this rank's random numbers): Progress, Line, clock,
        metrics file's length."""
        setup, args, world = self.setup, self.args, self.world
        fields = [f.name for f in dataclasses.fields(Progress) + dataclasses.fields(Line)]
        saved = checkpoint.load_resume(args.resume, setup.model, setup.corpus.dictionary, args, self.recipe,
                                       fields + ['elapsed', 'metrics_bytes', 'metrics_sha256'], len(setup.batch_starts),
                                       world.rank, world.size)
        # SAVE.resume may be --resume (it is replaced only after it was read); --save and the metrics file may not.
        # Checked once --resume is known to be a resume checkpoint, before anything is written.
        for name, path in (('--save', args.save), ('SAVE.metrics.jsonl', args.save + '.metrics.jsonl')):
            check_output_file(name, path, [('--resume', args.resume)])
        progress = Progress(**{f.name: saved[f.name] for f in dataclasses.fields(Progress)})
        line = Line(**{f.name: saved[f.name] for f in dataclasses.fields(Line)})
        progress.hidden = world.my_columns(progress.hidden, args.batch_size)
        print(f'| resuming {args.resume} at epoch {progress.epoch}, batch {progress.next_batch}', flush=True)
        return progress, line, saved['elapsed'], saved['metrics_bytes'], saved['metrics_sha256']

    def diverged(self, why=None):
        lr = self.recipe.optimizer.param_groups[0]['lr']
        kept = (f'the best model so far is kept in {self.args.save}' if self.progress.best_val_loss is not None
                else 'no model was saved')
        if why is not None:
            return TrainingDiverged(f'training diverged in epoch {self.progress.epoch}: {why}; {kept}.')
        return TrainingDiverged(f'training diverged: the loss or the gradients became inf or NaN in epoch '
                                f'{self.progress.epoch} with lr {lr:g} (try a smaller --lr); {kept}.')


def reported(steps, what, first_after=5.0, every=10.0):
    """steps, one at a time; a loop that lasts longer than first_after seconds prints how far it is and how long
    it has left, then again every `every` seconds (what: 'evaluating', ...)."""
    steps = list(steps)
    start = time.time()
    due = start + first_after
    for done, step in enumerate(steps, 1):
        yield step
        now = time.time()
        if now >= due and done < len(steps):
            left = (now - start) / done * (len(steps) - done)
            print(f'| {what}: {done}/{len(steps)} batches, about {left:.0f}s left', flush=True)
            due = now + every


def export_best_model(args, progress):
    """--onnx-export: the best model, read back from --save, as ONNX (fp32, input [bptt, 1])."""
    if progress.best_val_loss is None:
        print(f'| no epoch finished, so there is no best model to export to {args.onnx_export}', flush=True)
        return
    onnx_export.export(args.save, args.onnx_export, args.bptt)
    print(f'| the best model is exported to ONNX in {args.onnx_export}', flush=True)


@contextlib.contextmanager
def stopping_if_lost(what):
    """A save that fails stops the run with one sentence that says what was lost; files saved before stay whole."""
    try:
        yield
    except WriteError as e:
        raise WriteError(f'{e}; {what} (files saved before are unchanged).') from None
