"""training.py's loop: skipped updates counted and reported, stopping and continuing, evaluate."""
import argparse
import contextlib
import re
import signal
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import data
import training
from model import RNNModel
from plumbing import distributed
from plumbing.session import Session

NTOKEN = 24


class SkippingRecipe:
    """SGD that skips the updates of the given (1-based) steps, halving its loss scale as it does."""

    name = 'skipping'
    optimizer_name = 'SGD'

    def describe(self):
        return 'skipping'

    def __init__(self, model, skip, loss_scale=64.0):
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        self.skip, self.calls, self.loss_scale = set(skip), 0, loss_scale

    def autocast(self):
        return contextlib.nullcontext()

    def step(self, loss):
        self.calls += 1
        loss.backward()
        if self.calls in self.skip:
            self.optimizer.zero_grad()
            if self.loss_scale is not None:
                self.loss_scale /= 2
            return False
        self.optimizer.step()
        self.optimizer.zero_grad()
        return True


def tiny_setup(tmp_path, nbatches=6, log_interval=2):
    torch.manual_seed(0)
    args = argparse.Namespace(batch_size=2, bptt=3, log_interval=log_interval, dry_run=False, resume=None,
                              save=str(tmp_path / 'model.pt'), onnx_export='', epochs=1)
    stream = torch.randint(NTOKEN, (2 * (3 * nbatches + 1),))
    train_data = data.batchify(stream, 2)
    model = RNNModel('LSTM', NTOKEN, 8, 8, 1, dropout=0.0)
    setup = SimpleNamespace(args=args, model=model, world=distributed.World(), train_data=train_data,
                            device=torch.device('cpu'), batch_starts=range(0, train_data.size(0) - 1, args.bptt),
                            ntokens=NTOKEN, corpus=SimpleNamespace(train=stream))
    assert len(setup.batch_starts) == nbatches
    return setup


@pytest.fixture
def open_session(tmp_path):
    """open_session(setup, recipe): a Session entered for the test (its lock, stop handling and metrics file)."""
    with contextlib.ExitStack() as stack:
        yield lambda setup, recipe: stack.enter_context(Session(setup, recipe))


def periodic_skips(out):
    return [int(n) for n in re.findall(r'^\| epoch +\d+ \| .* \| skipped (\d+)$', out, re.M)]


@pytest.mark.parametrize('loss_scale', [64.0, None])
def test_train_epoch_counts_and_reports_skipped_updates(loss_scale, capsys, open_session, tmp_path):
    setup = tiny_setup(tmp_path)
    recipe = SkippingRecipe(setup.model, skip={2, 3, 6}, loss_scale=loss_scale)
    session = open_session(setup, recipe)
    progress = session.progress
    # 5 skipped in earlier epochs
    progress.epoch, progress.skipped = 4, 5
    assert training.train_epoch(setup, recipe, progress, session)
    out = capsys.readouterr().out
    skips = [line for line in out.splitlines() if line.startswith('| gradients are not finite')]
    if loss_scale is None:
        assert skips == [f'| gradients are not finite: update skipped ({n} so far)' for n in (6, 7, 8)]
    else:  # the scale after the skip
        assert skips == [f'| gradients are not finite: update skipped ({n} so far, loss scale now {s:g})'
                         for n, s in ((6, 32.0), (7, 16.0), (8, 8.0))]
    assert progress.skipped == 8
    # the periodic lines count this epoch's skips so far
    assert periodic_skips(out) == [1, 2, 3]
    assert all(line.startswith('| epoch   4 |') for line in out.splitlines() if line.startswith('| epoch'))
    assert (progress.next_batch, progress.epoch) == (6, 4)


def test_train_epoch_without_skips_counts_none(capsys, open_session, tmp_path):
    setup = tiny_setup(tmp_path)
    recipe = SkippingRecipe(setup.model, skip=())
    session = open_session(setup, recipe)
    training.train_epoch(setup, recipe, session.progress, session)
    out = capsys.readouterr().out
    assert 'not finite' not in out
    assert session.progress.skipped == 0 and periodic_skips(out) == [0, 0, 0]


def progress_lines(out):
    """The periodic progress lines, with the timing columns (ms/batch, tok/s, eta) blanked."""
    return [re.sub(r'(ms/batch|tok/s|eta) +[\d.]+s?', r'\1 _', line) for line in out.splitlines()
            if line.startswith('| epoch')]


def test_train_epoch_stops_when_asked_and_continues_with_the_same_lines(capsys, open_session, tmp_path):
    """A stop request ends the epoch after the current batch; train_epoch with the same progress
    continues from the next batch, carrying on the hidden state, the skip count and the progress
    line being summed: it prints the lines of an uninterrupted epoch, skipped counts included."""
    setup = tiny_setup(tmp_path / 'a', log_interval=4)
    (tmp_path / 'a').mkdir()
    recipe = SkippingRecipe(setup.model, skip={1, 3})
    session = open_session(setup, recipe)
    training.train_epoch(setup, recipe, session.progress, session)
    uninterrupted = progress_lines(capsys.readouterr().out)
    assert len(uninterrupted) == 1 and uninterrupted[0].endswith('| skipped 2'), uninterrupted

    setup = tiny_setup(tmp_path, log_interval=4)
    recipe = SkippingRecipe(setup.model, skip={1, 3})
    session = open_session(setup, recipe)
    progress = session.progress
    calls = []
    original = training.train_batch

    def train_batch(*args):
        calls.append(args[2].clone())
        if len(calls) == 2:
            session.stop.signum = signal.SIGINT
        return original(*args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training, 'train_batch', train_batch)
        assert not training.train_epoch(setup, recipe, progress, session)
        assert progress.next_batch == 2 and progress.hidden is not None and progress.skipped == 1
        line = session.line
        assert (line.line_start, line.line_tokens) == (0, 2 * 2 * 3) and line.line_loss > 0
        # the line spanning the stop is printed once, after it
        assert not progress_lines(capsys.readouterr().out)
        session.stop.signum = None
        session.start_line()
        assert training.train_epoch(setup, recipe, progress, session)
    assert progress.next_batch == 6 and progress.skipped == 2
    assert progress_lines(capsys.readouterr().out) == uninterrupted
    assert len(calls) == 6
    expected = [data.get_batch(setup.train_data, i, 3)[0] for i in setup.batch_starts]
    assert all(torch.equal(a, b) for a, b in zip(calls, expected))


def test_evaluate_one_batch_is_the_loss_of_the_first_batch():
    torch.manual_seed(0)
    model = RNNModel('GRU', 24, 8, 8, 1, dropout=0.0)
    source = data.batchify(torch.randint(24, (10 * 31,)), 10)  # 31 rows: batches of 10, 10, 10 rows
    loss = training.evaluate(model, source, 10, contextlib.nullcontext, one_batch=True)
    with torch.no_grad():
        inputs, targets = data.get_batch(source, 0, 10)
        logits, _ = model(inputs, model.init_hidden(10))
        first = F.cross_entropy(logits.view(-1, 24), targets).item()
    assert abs(loss - first) < 1e-6
    assert abs(training.evaluate(model, source, 10, contextlib.nullcontext) - first) > 1e-4  # all three batches
