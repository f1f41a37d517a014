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
"""
import argparse
import contextlib
import math
import os
import signal
import sys
import time

import torch
import torch.nn.functional as F

import checkpoint
import data
from model import RNNModel, RNN_TYPES, repackage_hidden

EVAL_BATCH_SIZE = 10


def build_parser(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument('--data', type=str, default=data.DEFAULT_DATA,
                   help='location of the data corpus (train.txt, valid.txt, test.txt); '
                        'WikiText-2 is downloaded there if it is the default and missing')
    p.add_argument('--model', type=str, default='LSTM', help=f'type of recurrent net ({", ".join(RNN_TYPES)})')
    p.add_argument('--emsize', type=int, default=1504, help='size of word embeddings')
    p.add_argument('--nhid', type=int, default=1504, help='number of hidden units per layer')
    p.add_argument('--nlayers', type=int, default=2, help='number of layers')
    p.add_argument('--lr', type=float, default=20, help='initial learning rate')
    p.add_argument('--clip', type=float, default=0.25, help='gradient clipping (max total norm)')
    p.add_argument('--epochs', type=int, default=40, help='upper epoch limit')
    p.add_argument('--batch_size', type=int, default=24, metavar='N', help='batch size')
    p.add_argument('--bptt', type=int, default=35, help='sequence length')
    p.add_argument('--dropout', type=float, default=0.65, help='dropout applied to layers (0 = no dropout)')
    p.add_argument('--tied', action='store_true', help='tie the word embedding and softmax weights')
    p.add_argument('--seed', type=int, default=1111, help='random seed')
    p.add_argument('--cuda', action='store_true', help='use CUDA')
    p.add_argument('--log-interval', type=int, default=200, metavar='N', help='report interval')
    p.add_argument('--save', type=str, default='model.pt', help='path to save the final model')
    p.add_argument('--fp16', action='store_true',
                   help='train an fp16 model with fp32 master weights and a loss scale')
    p.add_argument('--static-loss-scale', type=float, default=128.0,
                   help='static loss scale for --fp16; powers of 2 keep the scaling exact')
    return p


def fail(message, code=1):
    """Print one sentence and exit: the scripts' way to report bad input."""
    print(f'{os.path.basename(sys.argv[0])}: error: {message}', file=sys.stderr)
    sys.exit(code)


def ppl(loss):
    return math.exp(loss) if loss < 700 else float('inf')


def select_device(args):
    if args.cuda and not torch.cuda.is_available():
        fail('--cuda was given but no CUDA device is available.')
    if torch.cuda.is_available() and not args.cuda:
        print('WARNING: You have a CUDA device, so you should probably run with --cuda')
    return torch.device('cuda' if args.cuda else 'cpu')


def load_corpus(args):
    """The corpus, its dictionary padded to a multiple of 8 so the decoder GEMM can use Tensor Cores."""
    try:
        if os.path.normpath(args.data) == os.path.normpath(data.DEFAULT_DATA):
            data.download_wikitext2(args.data)
        return data.Corpus(args.data, pad_to_multiple_of=8)
    except data.DataError as e:
        fail(str(e))


class Run:
    """Everything set up from the flags: device, data (batchified, on the device), model."""

    def __init__(self, args):
        self.args = args
        torch.manual_seed(args.seed)
        self.device = select_device(args)
        self.corpus = load_corpus(args)
        self.ntokens = len(self.corpus.dictionary)
        self.train_data = data.batchify(self.corpus.train, args.batch_size).to(self.device)
        self.val_data = data.batchify(self.corpus.valid, EVAL_BATCH_SIZE).to(self.device)
        self.test_data = data.batchify(self.corpus.test, EVAL_BATCH_SIZE).to(self.device)
        try:
            self.model = RNNModel(args.model, self.ntokens, args.emsize, args.nhid, args.nlayers,
                                  args.dropout, args.tied).to(self.device)
        except ValueError as e:
            fail(str(e), 2)
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


class SGDStep:
    """fp32 weights and plain SGD (p -= lr * grad) after clipping the gradient norm."""

    def __init__(self, model, args):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, lr=args.lr, foreach=True)
        self.clip = args.clip
        self.skipped = 0

    autocast = staticmethod(contextlib.nullcontext)

    @property
    def lr(self):
        return self.optimizer.param_groups[0]['lr']

    @lr.setter
    def lr(self, value):
        for group in self.optimizer.param_groups:
            group['lr'] = value

    loss_scale = None

    def describe(self):
        return 'fp32'

    def step(self, loss):
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        finite = bool(torch.isfinite(norm))  # the step's one host sync
        if finite:
            self.optimizer.step()
        else:
            report_skip(self)
        self.optimizer.zero_grad(set_to_none=True)
        return finite


def report_skip(stepper):
    """Count a skipped update and say so."""
    stepper.skipped += 1
    scale = '' if stepper.loss_scale is None else f' at loss scale {stepper.loss_scale:g}'
    print(f'| gradients are not finite{scale}: update skipped ({stepper.skipped} so far)', flush=True)


class StopRequest:
    """Ctrl-C (SIGINT) asks training to stop after the current batch; a second one quits at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)

    def handle(self, signum, frame):
        if self.requested:
            print('\n| second interrupt: exiting now', flush=True)
            sys.exit(130)
        self.requested = True
        print('\n| interrupt: stopping after this batch (Ctrl-C again to quit at once)', flush=True)


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


def train_epoch(run, stepper, epoch, stop):
    args, model = run.args, run.model
    model.train()
    hidden = model.init_hidden(args.batch_size)
    nbatches = (run.train_data.size(0) - 1 + args.bptt - 1) // args.bptt
    total_loss = torch.zeros((), device=run.device)
    tokens, skipped_at_start = 0, stepper.skipped
    start = epoch_start = time.time()
    for batch, i in enumerate(range(0, run.train_data.size(0) - 1, args.bptt)):
        inputs, targets = data.get_batch(run.train_data, i, args.bptt)
        # Detach the hidden state so backprop stops at the start of this batch
        # instead of running back to the beginning of the data set.
        hidden = repackage_hidden(hidden)
        with stepper.autocast():
            output, hidden = model(inputs, hidden)
            loss = F.cross_entropy(output.view(-1, run.ntokens).float(), targets)
        stepper.step(loss)
        total_loss += loss.detach()
        tokens += targets.numel()
        done = batch + 1
        if done % args.log_interval == 0 or stop.requested:
            cur_loss = total_loss.item() / (done % args.log_interval or args.log_interval)
            elapsed = time.time() - start
            ms_per_batch = elapsed * 1000 / (done % args.log_interval or args.log_interval)
            eta = (time.time() - epoch_start) / done * (nbatches - done)
            scale = '' if stepper.loss_scale is None else f' | loss scale {stepper.loss_scale:g}'
            print(f'| epoch {epoch:3d} | {done:5d}/{nbatches:5d} batches | lr {stepper.lr:02.2f} '
                  f'| ms/batch {ms_per_batch:5.2f} | loss {cur_loss:5.2f} | ppl {ppl(cur_loss):8.2f} '
                  f'| tok/s {tokens / elapsed:7.0f} | eta {eta:4.0f}s{scale} '
                  f'| skipped {stepper.skipped - skipped_at_start}', flush=True)
            total_loss.zero_()
            tokens, start = 0, time.time()
        if stop.requested:
            break


def train(run, stepper):
    """The epoch loop: train, validate, keep the best model, anneal lr; then test."""
    args, model = run.args, run.model
    print(f'| device {run.device} | precision {stepper.describe()} | vocabulary {run.ntokens} '
          f'| train tokens {len(run.corpus.train)}', flush=True)
    best_val_loss = None
    saved = False
    with StopRequest() as stop:
        for epoch in range(1, args.epochs + 1):
            epoch_start = time.time()
            train_epoch(run, stepper, epoch, stop)
            if stop.requested:
                print('-' * 89)
                print('Exiting from training early')
                break
            val_loss = evaluate(model, run.val_data, args.bptt, stepper.autocast)
            print('-' * 89)
            print(f'| end of epoch {epoch:3d} | time: {time.time() - epoch_start:5.2f}s '
                  f'| valid loss {val_loss:5.2f} | valid ppl {ppl(val_loss):8.2f}')
            print('-' * 89, flush=True)
            if best_val_loss is None or val_loss < best_val_loss:
                best_val_loss = val_loss
                checkpoint.save(checkpoint.model_checkpoint(model, run.corpus.dictionary, args, best_val_loss),
                                args.save)
                saved = True
            else:
                # No improvement on validation: anneal the learning rate.
                stepper.lr /= 4.0
        if saved:
            best = checkpoint.load(args.save)
            model.load_state_dict(best['model'])
        else:
            print('| no epoch finished, so there is no best model: testing the current weights')
        test_loss = evaluate(model, run.test_data, args.bptt, stepper.autocast)
    print('=' * 89)
    print(f'| End of training | test loss {test_loss:5.2f} | test ppl {ppl(test_loss):8.2f}')
    print('=' * 89, flush=True)
