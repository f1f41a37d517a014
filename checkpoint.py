"""Checkpoints: one dict of plain data and tensors, written atomically, read with weights_only."""
import contextlib
import os
import pickle
import secrets
import zipfile

import torch

from model import RNNModel

FORMAT = 'word_language_model/1'


class CheckpointError(Exception):
    """A checkpoint that cannot be used, worded for the user."""


class CannotResume(CheckpointError):
    """A sound checkpoint that --resume cannot continue with these flags (a usage error)."""


@contextlib.contextmanager
def atomic_write(path, mode='wb', **open_args):
    """A file object for a temporary file beside path, renamed over path once the block ends.

    A crash or Ctrl-C during the write leaves the previous file at path intact and no
    temporary file behind. The file gets an ordinary file's permissions under the umask.
    """
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f'.{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp')
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask, as open() does
        with os.fdopen(fd, mode, **open_args) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # also a second Ctrl-C, which may come after the rename
        with contextlib.suppress(FileNotFoundError):
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


# Flags a resumed run must share with the run it continues, as the user types them.
RESUME_MUST_MATCH = {'model': '--model', 'emsize': '--emsize', 'nhid': '--nhid', 'nlayers': '--nlayers',
                     'tied': '--tied', 'batch_size': '--batch_size', 'bptt': '--bptt', 'fp16': '--fp16',
                     'amp': '--amp', 'bf16': '--bf16', 'dynamic_loss_scale': '--dynamic-loss-scale'}


def save_resume(path, model, dictionary, args, recipe, progress):
    """SAVE.resume: the best-model fields, plus the recipe's state, the loop's progress and the RNGs."""
    ckpt = model_checkpoint(model, dictionary, args, progress['best_val_loss'])
    on_cuda = next(model.parameters()).device.type == 'cuda'
    ckpt['resume'] = {
        'progress': progress, 'recipe': recipe.name, 'recipe_state': recipe.state_dict(),
        'rng': torch.get_rng_state(), 'cuda_rng': torch.cuda.get_rng_state_all() if on_cuda else [],
    }
    save(ckpt, path)


def load_resume(path, model, dictionary, args, recipe):
    """Restore the model, the recipe and the RNGs from SAVE.resume; returns the loop's progress."""
    ckpt = load(path)
    if 'resume' not in ckpt:
        raise CannotResume(f'{path} is a best-model checkpoint, not a resume checkpoint (those are named SAVE.resume).')
    try:
        saved_args, saved_words, state = ckpt['args'], ckpt['vocab']['idx2word'], ckpt['resume']
        if 'progress' not in state:
            raise CannotResume(f'{path} was written by an earlier version of this example and cannot be resumed.')
        differences = [f'{flag} was {saved_args.get(key, False)}, now {getattr(args, key, False)}'
                       for key, flag in RESUME_MUST_MATCH.items() if saved_args.get(key, False) != getattr(args, key, False)]
        if saved_words != dictionary.idx2word:
            differences.append(f'the vocabulary differs ({len(saved_words)} words saved, {len(dictionary)} in --data)')
        if not differences and state['recipe'] != recipe.name:
            differences.append(f"the precision recipe was {state['recipe']}, now {recipe.name}")
        if differences:
            raise CannotResume(f'cannot resume from {path}: ' + '; '.join(differences) + '.')
        model.load_state_dict(ckpt['model'])
        recipe.load_state_dict(state['recipe_state'])
        torch.set_rng_state(state['rng'])
        if state['cuda_rng']:
            torch.cuda.set_rng_state_all(state['cuda_rng'])
        progress = dict(state['progress'])
        device = next(model.parameters()).device
        hidden = progress['hidden']
        if hidden is not None:
            progress['hidden'] = tuple(h.to(device) for h in hidden) if isinstance(hidden, (tuple, list)) else hidden.to(device)
    except CONTENT_ERRORS as e:
        raise CheckpointError(f'{path} is damaged or incompatible: {describe_error(e)}') from None
    return progress
