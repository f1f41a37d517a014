"""Checkpoints: one dict of plain data and tensors, written atomically, read with weights_only."""
import contextlib
import os
import pickle
import tempfile
import zipfile

import torch

from model import RNNModel

FORMAT = 'word_language_model/1'


class CheckpointError(Exception):
    """A checkpoint that cannot be used, worded for the user."""


@contextlib.contextmanager
def atomic_write(path, mode='wb', **open_args):
    """A file object for a temporary file beside path, renamed over path once the block ends.

    A crash or Ctrl-C during the write leaves the previous file at path intact and no
    temporary file behind.
    """
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=f'.{os.path.basename(path)}.',
                               suffix='.tmp')
    try:
        with os.fdopen(fd, mode, **open_args) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save(obj, path):
    """torch.save, atomically."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def load(path):
    """The checkpoint dict at path, on the CPU; a CheckpointError says why it cannot be used."""
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path} does not exist.')
    try:  # torch.load does not check the zip's CRC-32s, so flipped bytes in a tensor would load silently
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError):
        damaged = None  # not a zip: torch.load below says what it is
    if damaged is not None:
        raise CheckpointError(f'{path} is corrupt (the checksum of {damaged} does not match).')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'GLOBAL' in str(e):  # the pickle names a class or function to call
            raise CheckpointError(
                f'{path} holds Python objects other than tensors and plain data; it was refused because '
                f'loading it could run code (checkpoints of the original example pickled the whole model).') from None
        raise CheckpointError(f'{path} is corrupt or not a PyTorch checkpoint.') from None
    except Exception:  # torch.load fails on junk in many ways (RuntimeError, EOFError, KeyError, ...)
        raise CheckpointError(f'{path} is truncated, corrupt or not a PyTorch checkpoint.') from None
    if not isinstance(ckpt, dict) or ckpt.get('format') != FORMAT:
        raise CheckpointError(f'{path} is not a checkpoint written by this example.')
    return ckpt


def model_args(model):
    return dict(rnn_type=model.rnn_type, ntoken=model.encoder.num_embeddings, ninp=model.encoder.embedding_dim,
                nhid=model.nhid, nlayers=model.nlayers, dropout=model.drop.p,
                tie_weights=model.decoder.weight is model.encoder.weight)


def model_checkpoint(model, dictionary, args, best_val_loss):
    """The best-model file: weights, how to rebuild the model, vocabulary, flags, validation loss."""
    return {
        'format': FORMAT,
        'model_args': model_args(model),
        'model': model.state_dict(),
        'vocab': {'idx2word': list(dictionary.idx2word), 'padding': list(dictionary.padding)},
        'args': vars(args),
        'best_val_loss': best_val_loss,
    }


# What using a loaded checkpoint's contents raises when they are missing, mistyped or mismatched.
CONTENT_ERRORS = (KeyError, TypeError, ValueError, RuntimeError, AttributeError)


def load_model(path):
    """(fp32 RNNModel on the CPU, idx2word, padding indices) from a best-model checkpoint."""
    ckpt = load(path)
    try:
        model = RNNModel(**ckpt['model_args'])
        model.load_state_dict({k: v.float() for k, v in ckpt['model'].items()})
        vocab = ckpt['vocab']
        if len(vocab['idx2word']) != model.encoder.num_embeddings:
            raise ValueError('vocabulary size does not match the model')
    except CONTENT_ERRORS as e:
        raise CheckpointError(f'{path} is damaged or incompatible: {describe_error(e)}') from None
    return model, vocab['idx2word'], vocab['padding']


def describe_error(e):
    """The first two lines of an exception's message on one line (load_state_dict puts the detail second)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return ' '.join(lines[:2]) or type(e).__name__
