"""What the training scripts share: flags, data, model, the loop, evaluation, checkpoints.

main.py and main_fp16_optimizer.py differ only in how one update is made in fp16
(by hand, or by FP16_Optimizer); each passes its update step to train().
An update step has:
    autocast()   context for the forward pass
    step(loss)   backward and update; returns False when it skipped the update
    lr           learning rate (settable)
    loss_scale   the current loss scale, or None when the recipe does not scale
    describe()   one line for the log
    skipped      how many updates were skipped for non-finite gradients
    state_dict() / load_state_dict()   what a resumed run needs (masters, optimizer, scaler)
"""
import argparse
import math
import os
import signal
import sys
import time

import torch
import torch.nn.functional as F

import checkpoint
import data
from cli import add_device_flags, check_output_file, fail, select_device
from model import RNNModel, RNN_TYPES, repackage_hidden

EVAL_BATCH_SIZE = 10


def build_parser(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument('--data', type=str, default=data.DEFAULT_DATA,
                   help='directory holding train.txt, valid.txt and test.txt; '
                        'WikiText-2 is downloaded there if it is the default and missing')
    p.add_argument('--model', type=str, default='LSTM', help=f'recurrent layer type: {", ".join(RNN_TYPES)}')
    p.add_argument('--emsize', type=int, default=1504, help='word embedding width')
    p.add_argument('--nhid', type=int, default=1504, help='hidden state width of each RNN layer')
    p.add_argument('--nlayers', type=int, default=2, help='how many RNN layers are stacked')
    p.add_argument('--lr', type=float, default=20, help='learning rate to start from (divided by 4 whenever validation stops improving)')
    p.add_argument('--clip', type=float, default=0.25, help='clip the total gradient norm to this value')
    p.add_argument('--epochs', type=int, default=40, help='how many epochs to train at most')
    p.add_argument('--batch_size', type=int, default=24, metavar='N', help='columns the training text is cut into (the batch dimension)')
    p.add_argument('--bptt', type=int, default=35, help='steps of truncated backpropagation through time per batch')
    p.add_argument('--dropout', type=float, default=0.65, help='dropout probability after the embedding, between layers and before the decoder')
    p.add_argument('--tied', action='store_true', help='share one matrix between the embedding and the decoder (needs emsize == nhid)')
    p.add_argument('--seed', type=int, default=1111, help='seed for torch\'s random number generators')
    add_device_flags(p)
    p.add_argument('--log-interval', type=int, default=200, metavar='N', help='print a progress line every N batches')
    p.add_argument('--save', type=str, default='model.pt', help='where the best model (by validation loss) is written')
    precision = p.add_mutually_exclusive_group()
    precision.add_argument('--fp16', action='store_true',
                           help='train an fp16 model with fp32 master weights and a loss scale')
    precision.add_argument('--amp', action='store_true',
                           help='fp32 weights, forward under torch.autocast(float16), torch.amp.GradScaler')
    precision.add_argument('--bf16', action='store_true',
                           help='fp32 weights, forward under torch.autocast(bfloat16), no loss scaling')
    p.add_argument('--static-loss-scale', type=float, default=128.0,
                   help='static loss scale for --fp16; powers of 2 keep the scaling exact')
    p.add_argument('--resume', type=str, default=None, metavar='CHECKPOINT',
                   help='continue the run saved in CHECKPOINT (SAVE.resume, written after every epoch and on Ctrl-C)')
    return p


# Flags that must hold positive integers, as the user types them.
POSITIVE_FLAGS = {'emsize': '--emsize', 'nhid': '--nhid', 'nlayers': '--nlayers', 'epochs': '--epochs',
                  'batch_size': '--batch_size', 'bptt': '--bptt', 'log_interval': '--log-interval'}


def check_args(args):
    """Reject bad flag values and unusable paths before anything is loaded or trained (exit 2)."""
    for name, flag in POSITIVE_FLAGS.items():
        if getattr(args, name) < 1:
            fail(f'{flag} must be at least 1 (got {getattr(args, name)}).', 2)
    if not 0 <= args.dropout < 1:
        fail(f'--dropout must be in [0, 1) (got {args.dropout:g}).', 2)
    for flag, value in (('--lr', args.lr), ('--clip', args.clip), ('--static-loss-scale', args.static_loss_scale)):
        if not (value > 0 and math.isfinite(value)):
            fail(f'{flag} must be a positive number (got {value:g}).', 2)
    if args.model not in RNN_TYPES:
        fail(f"--model {args.model} is not a known rnn type; choose one of {', '.join(RNN_TYPES)}.", 2)
    if args.tied and args.emsize != args.nhid:
        fail(f'--tied needs --emsize equal to --nhid (got emsize {args.emsize}, nhid {args.nhid}).', 2)
    if not uses_default_data(args) and not os.path.isdir(args.data):
        fail(f'--data {args.data}: no such directory.', 2)
    check_output_file('--save', args.save)
    if args.resume is not None and not os.path.isfile(args.resume):
        fail(f'--resume {args.resume}: no such file.', 2)


def ppl(loss):
    return math.exp(loss) if loss < 700 else float('inf')


def uses_default_data(args):
    """--data is the default directory, which is downloaded into when its files are missing."""
    return os.path.normpath(args.data) == os.path.normpath(data.DEFAULT_DATA)


def load_corpus(args):
    """The corpus, its dictionary padded to a multiple of 8 so the decoder GEMM can use Tensor Cores."""
    try:
        if uses_default_data(args):
            data.download_wikitext2(args.data)
        return data.Corpus(args.data, pad_to_multiple_of=8)
    except data.DataError as e:
        fail(str(e))


class Run:
    """Everything set up from the flags: device, data (batchified, on the device), model."""

    def __init__(self, args):
        self.args = args
        check_args(args)
        torch.manual_seed(args.seed)
        self.device = select_device(args)
        self.corpus = load_corpus(args)
        self.ntokens = len(self.corpus.dictionary)
        self.check_split_sizes()
        self.train_data = data.batchify(self.corpus.train, args.batch_size).to(self.device)
        self.batch_starts = range(0, self.train_data.size(0) - 1, args.bptt)  # first row of each batch
        self.val_data = data.batchify(self.corpus.valid, EVAL_BATCH_SIZE).to(self.device)
        self.test_data = data.batchify(self.corpus.test, EVAL_BATCH_SIZE).to(self.device)
        self.model = RNNModel(args.model, self.ntokens, args.emsize, args.nhid, args.nlayers,
                              args.dropout, args.tied).to(self.device)
        if args.fp16:
            if self.ntokens % 8:
                print(f'Warning: the dictionary size (ntokens = {self.ntokens}) should be a multiple of 8 '
                      "to ensure Tensor Core use for the decoder's GEMMs.")
            if args.emsize % 8 or args.nhid % 8 or args.batch_size % 8:
                print(f'Warning: emsize = {args.emsize}, nhid = {args.nhid}, batch_size = {args.batch_size} '
                      "should all be multiples of 8 to ensure Tensor Core use for the RNN's GEMMs.")
        elif args.static_loss_scale != 1.0:
            print('Warning:  static_loss_scale != 1.0 is only necessary with --fp16. '
                  'Resetting static_loss_scale to 1.0')
            args.static_loss_scale = 1.0

    def check_split_sizes(self):
        """Each column of a batchified split needs 2 tokens at least: one input, one target."""
        path = lambda split: os.path.join(self.args.data, f'{split}.txt')
        ntrain = len(self.corpus.train)
        if ntrain // self.args.batch_size < 2:
            fail(f'--batch_size {self.args.batch_size} is too large for {path("train")} ({ntrain} tokens): '
                 f'each of the {self.args.batch_size} columns needs at least 2 tokens.', 2)
        for split in ('valid', 'test'):
            n = len(getattr(self.corpus, split))
            if n // EVAL_BATCH_SIZE < 2:
                fail(f'{path(split)} has {n} tokens, too few for evaluation in {EVAL_BATCH_SIZE} columns '
                     f'(it needs {2 * EVAL_BATCH_SIZE}).')


class SGDStep:
    """fp32 weights and SGD (p -= lr * grad) after clipping the gradient norm.

    With --amp the forward runs under autocast(float16) and torch.amp.GradScaler
    scales the loss (dynamically); with --bf16 under autocast(bfloat16), unscaled.
    """

    def __init__(self, model, args):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device_type = self.params[0].device.type
        fused = self.device_type == 'cuda'
        self.optimizer = torch.optim.SGD(self.params, lr=args.lr, foreach=not fused, fused=fused)
        self.clip = args.clip
        self.skipped = 0
        self.autocast_dtype = torch.float16 if args.amp else torch.bfloat16 if args.bf16 else None
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=args.amp)

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    @property
    def lr(self):
        return self.optimizer.param_groups[0]['lr']

    @lr.setter
    def lr(self, value):
        for group in self.optimizer.param_groups:
            group['lr'] = value

    @property
    def loss_scale(self):
        return self.scaler.get_scale() if self.scaler.is_enabled() else None

    def describe(self):
        if self.autocast_dtype is torch.float16:
            return 'amp: autocast float16, fp32 weights, GradScaler (dynamic loss scale)'
        if self.autocast_dtype is torch.bfloat16:
            return 'bf16: autocast bfloat16, fp32 weights, no loss scaling'
        return 'fp32'

    def step(self, loss):
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        finite = bool(torch.isfinite(norm + loss.detach()))  # the step's one host sync
        if finite:
            self.optimizer.step()
        elif not self.scaler.is_enabled() or not torch.isfinite(loss):
            # An inf/NaN fp32 loss, or gradients that were not scaled, cannot be overflow: divergence.
            raise TrainingDiverged()
        else:
            report_skip(self)
        self.scaler.update()  # lowers the scale if unscale_ found inf/NaN, raises it after 2000 clean steps
        self.optimizer.zero_grad(set_to_none=True)
        return finite

    def state_dict(self):
        return {'recipe': self.describe(), 'optimizer': self.optimizer.state_dict(),
                'scaler': self.scaler.state_dict(), 'skipped': self.skipped}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state['optimizer'])
        self.scaler.load_state_dict(state['scaler'])
        self.skipped = state['skipped']


class TrainingDiverged(Exception):
    """The loss, or the gradients of an unscaled (fp32 or bf16) step, are not finite."""


def report_skip(stepper):
    """Count a skipped update and say so."""
    stepper.skipped += 1
    scale = '' if stepper.loss_scale is None else f' at loss scale {stepper.loss_scale:g}'
    print(f'| gradients are not finite{scale}: update skipped ({stepper.skipped} so far)', flush=True)


class StopRequest:
    """SIGINT (Ctrl-C) or SIGTERM asks training to stop after the current batch; a second one quits at once.

    Files are written atomically, so quitting at any moment leaves every saved file whole.
    """
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None

    @property
    def requested(self):
        return self.signum is not None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.requested:
            print('\n| second signal: exiting now', flush=True)
            sys.exit(128 + signum)
        self.signum = signum
        print(f'\n| {signal.Signals(signum).name}: stopping after this batch (once more to quit at once)', flush=True)


def evaluate(model, source, bptt, autocast):
    """Mean cross-entropy per token over source, accumulated in fp32."""
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


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of fp16/bf16 logits [N, V], computed in fp32 a few rows at a time.

    F.cross_entropy under autocast first copies all N * V logits to fp32 and back; on a
    CPU, where the logits do not fit in cache, those passes cost as much as the decoder's
    matrix product. Here each chunk of rows is widened to fp32 while it is in cache: the
    forward keeps only each row's log-sum-exp; the backward recomputes the chunk's softmax
    and writes (softmax - one_hot) * grad / N, rounded once to the logits' dtype.
    """

    @staticmethod
    def forward(ctx, logits, targets, rows_per_chunk):
        lse = torch.empty(logits.size(0), 1, dtype=torch.float32, device=logits.device)
        for rows in chunks(logits.size(0), rows_per_chunk):
            lse[rows] = torch.logsumexp(logits[rows].float(), 1, keepdim=True)
        ctx.save_for_backward(logits, targets, lse)
        ctx.rows_per_chunk = rows_per_chunk
        target_logits = logits.gather(1, targets[:, None]).float()
        return (lse - target_logits).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        scale = grad_loss.float() / logits.size(0)
        for rows in chunks(logits.size(0), ctx.rows_per_chunk):
            probs = logits[rows].float().sub_(lse[rows]).exp_()
            t = targets[rows, None]
            probs.scatter_add_(1, t, torch.full_like(t, -1, dtype=probs.dtype))
            grad[rows] = probs.mul_(scale)
        return grad, None, None


def chunks(n, size):
    return (slice(start, start + size) for start in range(0, n, size))


CHUNK_BYTES = 4 << 20  # a chunk of logits that stays in a CPU's cache


def cross_entropy(logits, targets):
    """Mean cross-entropy in fp32 math; low-precision logits on a CPU go through ChunkedCrossEntropy."""
    if logits.dtype == torch.float32 or logits.device.type != 'cpu':
        return F.cross_entropy(logits.float(), targets)
    rows = max(1, CHUNK_BYTES // (logits.size(1) * 4))
    return ChunkedCrossEntropy.apply(logits, targets, rows)


def train_batch(model, stepper, inputs, targets, hidden):
    """One forward, backward and update; returns the (unscaled) loss and the new hidden state."""
    # Detach the hidden state so backprop stops at the start of this batch
    # instead of running back to the beginning of the data set.
    hidden = repackage_hidden(hidden)
    with stepper.autocast():
        output, hidden = model(inputs, hidden)
        loss = cross_entropy(output.view(-1, output.size(-1)), targets)
    stepper.step(loss)
    return loss.detach(), hidden


def train_epoch(run, stepper, epoch, stop, first_batch=0, hidden=None):
    """Train from batch first_batch to the end of the epoch, or until a stop is requested.

    Returns the index of the next batch to train and the hidden state to carry into it.
    """
    args, model = run.args, run.model
    model.train()
    if hidden is None:
        hidden = model.init_hidden(args.batch_size)
    starts = run.batch_starts
    total_loss = torch.zeros((), device=run.device)
    tokens, logged, skipped_at_start = 0, first_batch, stepper.skipped
    start = epoch_start = time.time()
    for batch in range(first_batch, len(starts)):
        inputs, targets = data.get_batch(run.train_data, starts[batch], args.bptt)
        loss, hidden = train_batch(model, stepper, inputs, targets, hidden)
        total_loss += loss
        tokens += targets.numel()
        done = batch + 1
        if done % args.log_interval == 0 or stop.requested:
            cur_loss = total_loss.item() / (done - logged)
            elapsed = time.time() - start
            eta = (time.time() - epoch_start) / (done - first_batch) * (len(starts) - done)
            scale = '' if stepper.loss_scale is None else f' | loss scale {stepper.loss_scale:g}'
            print(f'| epoch {epoch:3d} | {done:5d}/{len(starts):5d} batches | lr {stepper.lr:02.2f} '
                  f'| ms/batch {elapsed * 1000 / (done - logged):5.2f} | loss {cur_loss:5.2f} | ppl {ppl(cur_loss):8.2f} '
                  f'| tok/s {tokens / elapsed:7.0f} | eta {eta:4.0f}s{scale} '
                  f'| skipped {stepper.skipped - skipped_at_start}', flush=True)
            total_loss.zero_()
            tokens, logged, start = 0, done, time.time()
        if stop.requested:
            return done, hidden
    return len(starts), hidden


# Flags a resumed run must share with the run it continues.
RESUME_MUST_MATCH = ('model', 'emsize', 'nhid', 'nlayers', 'tied', 'batch_size', 'bptt',
                     'fp16', 'amp', 'bf16', 'dynamic_loss_scale')


def resume_path(args):
    return args.save + '.resume'


def save_resume(run, stepper, epoch, next_batch, hidden, best_val_loss):
    """Write SAVE.resume: the best-model fields plus what continuing exactly needs."""
    ckpt = checkpoint.model_checkpoint(run.model, run.corpus.dictionary, run.args, best_val_loss)
    ckpt['resume'] = {
        'epoch': epoch, 'next_batch': next_batch, 'hidden': hidden, 'step': stepper.state_dict(),
        'rng': torch.get_rng_state(),
        'cuda_rng': torch.cuda.get_rng_state_all() if run.device.type == 'cuda' else [],
    }
    checkpoint.save(ckpt, resume_path(run.args))


def load_resume(run, stepper):
    """Restore model, update step and RNG from --resume; returns (epoch, next_batch, hidden, best_val_loss)."""
    args, path = run.args, run.args.resume
    try:
        ckpt = checkpoint.load(path)
    except checkpoint.CheckpointError as e:
        fail(str(e))
    if 'resume' not in ckpt:
        fail(f'{path} is a best-model checkpoint, not a resume checkpoint (those are named SAVE.resume).', 2)
    try:
        saved_args, saved_words, state = ckpt['args'], ckpt['vocab']['idx2word'], ckpt['resume']
        differences = [f'{flag_name(key)} was {saved_args.get(key, False)}, now {getattr(args, key, False)}'
                       for key in RESUME_MUST_MATCH if saved_args.get(key, False) != getattr(args, key, False)]
        if saved_words != run.corpus.dictionary.idx2word:
            differences.append(f'the vocabulary differs ({len(saved_words)} words saved, {run.ntokens} in --data)')
        if not differences and state['step']['recipe'] != stepper.describe():
            differences.append(f"the precision recipe was '{state['step']['recipe']}', now '{stepper.describe()}'")
        if differences:
            fail(f'cannot resume from {path}: ' + '; '.join(differences) + '.', 2)
        run.model.load_state_dict(ckpt['model'])
        stepper.load_state_dict(state['step'])
        torch.set_rng_state(state['rng'])
        if state['cuda_rng']:
            torch.cuda.set_rng_state_all(state['cuda_rng'])
        hidden = state['hidden']
        if hidden is not None:
            hidden = tuple(h.to(run.device) for h in hidden) if isinstance(hidden, (tuple, list)) else hidden.to(run.device)
        epoch, next_batch, best_val_loss = int(state['epoch']), int(state['next_batch']), ckpt['best_val_loss']
    except checkpoint.CONTENT_ERRORS as e:
        fail(f'{path} is damaged or incompatible: {checkpoint.describe_error(e)}')
    print(f'| resuming {path} at epoch {epoch}, batch {next_batch}', flush=True)
    return epoch, next_batch, hidden, best_val_loss


def flag_name(dest):
    return POSITIVE_FLAGS.get(dest) or '--' + dest.replace('_', '-')


def train(run, stepper):
    """The epoch loop: train, validate, keep the best model, anneal lr; then test.

    After every epoch, and when a stop is requested, SAVE.resume records the run so
    that --resume continues it exactly.
    """
    args, model = run.args, run.model
    epoch, next_batch, hidden, best_val_loss = 1, 0, None, None
    if args.resume:
        epoch, next_batch, hidden, best_val_loss = load_resume(run, stepper)
    print(f'| device {run.device} | precision {stepper.describe()} | vocabulary {run.ntokens} '
          f'| train tokens {len(run.corpus.train)}', flush=True)
    with StopRequest() as stop:
        try:
            while epoch <= args.epochs and not stop.requested:
                epoch_start = time.time()
                next_batch, hidden = train_epoch(run, stepper, epoch, stop, next_batch, hidden)
                if next_batch < len(run.batch_starts):
                    break  # stopped inside the epoch: SAVE.resume continues from next_batch
                val_loss = evaluate(model, run.val_data, args.bptt, stepper.autocast)
                if not math.isfinite(val_loss):
                    raise TrainingDiverged()
                print('-' * 89)
                print(f'| end of epoch {epoch:3d} | time: {time.time() - epoch_start:5.2f}s '
                      f'| valid loss {val_loss:5.2f} | valid ppl {ppl(val_loss):8.2f}')
                print('-' * 89, flush=True)
                if best_val_loss is None or val_loss < best_val_loss:
                    best_val_loss = val_loss
                    checkpoint.save(checkpoint.model_checkpoint(model, run.corpus.dictionary, args, best_val_loss),
                                    args.save)
                else:
                    # No improvement on validation: anneal the learning rate.
                    stepper.lr /= 4.0
                epoch, next_batch, hidden = epoch + 1, 0, None
                save_resume(run, stepper, epoch, next_batch, hidden, best_val_loss)
        except TrainingDiverged:
            kept = f'the best model so far is kept in {args.save}' if best_val_loss is not None else 'no model was saved'
            fail(f'training diverged: the loss or the gradients became inf or NaN in epoch {epoch} with lr '
                 f'{stepper.lr:g} (try a smaller --lr); {kept}.')
        if stop.requested:
            if next_batch:
                save_resume(run, stepper, epoch, next_batch, hidden, best_val_loss)
            print('-' * 89)
            print(f'Exiting from training early; continue with --resume {resume_path(args)}')
        if best_val_loss is None:
            print('| no epoch finished, so there is no best model: testing the current weights')
        else:
            try:
                model.load_state_dict(checkpoint.load(args.save)['model'])
            except (checkpoint.CheckpointError, KeyError, RuntimeError) as e:
                print(f'| the best model cannot be loaded ({e}): testing the current weights')
        test_loss = evaluate(model, run.test_data, args.bptt, stepper.autocast)
    print('=' * 89)
    print(f'| End of training | test loss {test_loss:5.2f} | test ppl {ppl(test_loss):8.2f}')
    print('=' * 89, flush=True)
    if stop.signum == signal.SIGTERM:
        sys.exit(128 + signal.SIGTERM)
