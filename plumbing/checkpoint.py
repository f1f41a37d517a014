"""Checkpoints: one dict of plain data and tensors, written atomically, read with weights_only."""
import math
import os
import pickle
import re
import zipfile

import torch

from model import MODEL_TYPES, build_model
from plumbing.errors import CannotResume, CheckpointError
from plumbing.files import atomic_write

FORMAT = 'word_language_model/1'


def save(obj, path):
    """torch.save, atomically."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def load(path):
    """The checkpoint dict at path, on the CPU; a CheckpointError says why it cannot be used."""
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path} does not exist.')
    try:
        with open(path, 'rb') as f:
            is_zip = f.read(4) == b'PK\x03\x04'  # the test torch.load makes to read the file as a zip
    except OSError:
        is_zip = False  # torch.load below fails on it too, and says so
    if is_zip:  # other files are legacy checkpoints or junk: torch.load below says which
        check_archive(path)
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
    """What build_model rebuilds the model from (nhead only for the Transformer: RNN checkpoints are as before)."""
    args = dict(rnn_type=model.rnn_type, ntoken=model.encoder.num_embeddings, ninp=model.encoder.embedding_dim,
                nhid=model.nhid, nlayers=model.nlayers, dropout=model.drop.p,
                tie_weights=model.decoder.weight is model.encoder.weight)
    if model.rnn_type == 'Transformer':
        args['nhead'] = model.nhead
    return args


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
    """(fp32 RNNModel or TransformerModel on the CPU, idx2word, padding indices) from a best-model checkpoint."""
    return model_from(load(path), path)


def model_from(ckpt, path):
    """load_model's result from the checkpoint dict load(path) returned."""
    try:
        missing = [key for key in ('model_args', 'model', 'vocab') if key not in ckpt]
        if missing:
            raise ValueError(f"it has no {' and no '.join(missing)}.")
        args, weights, vocab = ckpt['model_args'], ckpt['model'], ckpt['vocab']
        check_weights(weights)
        check_model_args(args, weights)
        check_vocab(vocab, args['ntoken'])
        # NaN or inf weights (a run that diverged) would make every output NaN.
        broken = next((name for name, tensor in weights.items() if not torch.isfinite(tensor).all()), None)
        if broken is not None:
            raise ValueError(f'its weight {broken!r} holds inf or NaN values.')
        model = build_model(**args)
        model.load_state_dict({k: v.float() for k, v in weights.items()})
    except CONTENT_ERRORS as e:
        raise CheckpointError(f'{path} is damaged or incompatible: {describe_error(e)}') from None
    return model, vocab['idx2word'], vocab['padding']


def check_archive(path):
    """Refuse a zip that torch.save could not have written, or whose CRC-32s do not match, before torch.load reads it.

    torch.save stores its members uncompressed, so what torch.load allocates for them is bounded by
    the file's size. A compressed member could inflate to any size (a zip bomb), and members that
    declare more bytes than the file holds, or share its bytes, could make torch.load allocate more.
    """
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as archive:
            stored = 0
            for member in archive.infolist():
                if member.compress_type != zipfile.ZIP_STORED or member.flag_bits & 0x1:  # bit 0: encrypted
                    raise CheckpointError(f'{path} is not a checkpoint written by torch.save '
                                          f'(member {member.filename} is compressed or encrypted); refused.')
                stored += member.file_size
                if member.file_size != member.compress_size or member.header_offset + member.file_size > size \
                        or stored > size:
                    raise CheckpointError(f'{path} is corrupt (its member {member.filename} declares '
                                          f'more bytes than the file holds).')
            # torch.load does not check the CRC-32s, so flipped bytes in a tensor would load silently
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError):  # zipfile's errors on damage
        raise CheckpointError(f'{path} is truncated or corrupt (its zip archive cannot be read).') from None
    if damaged is not None:
        raise CheckpointError(f'{path} is corrupt (the checksum of {damaged} does not match).')


# RNNModel's arguments that count something, hence whole numbers of at least 1.
MODEL_SIZES = ('ntoken', 'ninp', 'nhid', 'nlayers')


def is_int(x, low, high=math.inf):
    """x is a whole number from low to high; bool is an int too, and is refused."""
    return type(x) is int and low <= x <= high


def check_weights(weights):
    """Raise ValueError unless weights map names to dense floating-point tensors on the CPU."""
    if not isinstance(weights, dict):
        raise ValueError(f'its weights are a {type(weights).__name__}, not a dict of tensors.')
    for name, tensor in weights.items():
        if not (isinstance(name, str) and isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided
                and not tensor.is_nested and tensor.device.type == 'cpu' and tensor.is_floating_point()):
            raise ValueError(f'its weight {name!r} is {describe_value(tensor)}, '
                             f'not a dense floating-point tensor stored in the file.')


def check_model_args(args, weights):
    """Raise ValueError unless args are RNNModel's (or TransformerModel's) arguments, each of the right type, for
    exactly the shapes of weights, and the model built from them needs no more bytes than the file holds for weights.

    model_args and a tensor's shape are only claims: a stride-0 view of one float has any shape, and
    many weights can share one storage, so only the bytes behind the weights bound the model.
    """
    transformer = isinstance(args, dict) and args.get('rnn_type') == 'Transformer'
    model_class, kind = ('TransformerModel', 'Transformer') if transformer else ('RNNModel', 'RNN')
    names = ('rnn_type', *MODEL_SIZES, 'dropout', 'tie_weights', *(('nhead',) if transformer else ()))
    if not isinstance(args, dict) or set(args) != set(names):
        raise ValueError(f"its model_args are not {model_class}'s arguments {', '.join(names)}.")
    valid = {'rnn_type': isinstance(args['rnn_type'], str) and args['rnn_type'] in MODEL_TYPES,
             **{name: is_int(args[name], 1) for name in MODEL_SIZES},
             'dropout': type(args['dropout']) in (int, float) and 0 <= args['dropout'] < 1,  # nan is refused
             'tie_weights': type(args['tie_weights']) is bool}
    if transformer:  # each head takes ninp / nhead dimensions
        valid['nhead'] = is_int(args['nhead'], 1) and valid['ninp'] and args['ninp'] % args['nhead'] == 0
    wrong = [f'{name} {describe_value(args[name])}' for name, ok in valid.items() if not ok]
    if wrong:
        raise ValueError(f"its model_args hold {', '.join(wrong)}, which {model_class} cannot take.")
    # Building even an empty model takes time in nlayers, so it must agree with the weights first.
    layer_weight = r'transformer\.layers\.\d+\.self_attn\.in_proj_weight' if transformer else r'rnn\.weight_hh_l\d+'
    layers = sum(bool(re.fullmatch(layer_weight, name)) for name in weights)
    if args['nlayers'] != layers:
        raise ValueError(f"its model_args ask for nlayers {args['nlayers']} but its weights hold {layers} {kind} "
                         f"layers.")
    # nhid is the Transformer's feed-forward width, the rows of each layer's linear1.
    nhid_shown = ('transformer.layers.0.linear1.weight', 0) if transformer else ('rnn.weight_hh_l0', 1)
    shown = {'ntoken': ('encoder.weight', 0), 'ninp': ('encoder.weight', 1), 'nhid': nhid_shown}
    for arg, (name, dim) in shown.items():
        tensor = weights.get(name)
        if tensor is None or tensor.dim() != 2 or tensor.shape[dim] != args[arg]:
            have = 'missing' if tensor is None else describe_value(tensor)
            raise ValueError(f'its model_args ask for {arg} {args[arg]} but its weight {name} is {have}.')
    shapes = weight_shapes(args)
    for name in sorted(shapes.keys() | weights.keys()):
        if name not in weights or name not in shapes or tuple(weights[name].shape) != shapes[name]:
            have = describe_value(weights[name]) if name in weights else 'missing'
            need = f'shape {shapes[name]}' if name in shapes else 'no such weight'
            raise ValueError(f'its weight {name} is {have}, but its model_args need {need}.')
    # The tied decoder is the encoder's matrix, not a second one.
    needed = sum(t.numel() * t.element_size() for name, t in weights.items()
                 if not (args['tie_weights'] and name == 'decoder.weight'))
    held = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in weights.values()}.values())
    if needed > held:
        raise ValueError(f'its weights claim {needed} bytes but the file holds only {held} bytes of them.')


def weight_shapes(args):
    """The shapes of the weights of build_model(**args), which is not built: its RNN, or one Transformer layer,
    is built on the meta device, where nothing is allocated (an Embedding there would import sympy, a second's work)."""
    ntoken, ninp, nhid = args['ntoken'], args['ninp'], args['nhid']
    if args['rnn_type'] == 'Transformer':
        layer = torch.nn.TransformerEncoderLayer(ninp, args['nhead'], nhid, device='meta')
        return {'encoder.weight': (ntoken, ninp),
                **{f'transformer.layers.{i}.{name}': tuple(t.shape)
                   for i in range(args['nlayers']) for name, t in layer.state_dict().items()},
                'decoder.weight': (ntoken, ninp), 'decoder.bias': (ntoken,)}
    rnn_class = torch.nn.RNN if args['rnn_type'].startswith('RNN_') else getattr(torch.nn, args['rnn_type'])
    rnn = rnn_class(ninp, nhid, args['nlayers'], device='meta')
    return {'encoder.weight': (ntoken, ninp),
            **{f'rnn.{name}': tuple(t.shape) for name, t in rnn.state_dict().items()},
            'decoder.weight': (ntoken, nhid), 'decoder.bias': (ntoken,)}


def check_vocab(vocab, ntoken):
    """Raise ValueError unless vocab holds ntoken words, of which its padding indices are some but not all."""
    words, padding = (vocab.get('idx2word'), vocab.get('padding')) if isinstance(vocab, dict) else (None, None)
    if type(words) is not list:
        raise ValueError(f'its vocabulary idx2word is {describe_value(words)}, not a list of words.')
    not_words = [word for word in words if not isinstance(word, str)]
    if not_words:
        raise ValueError(f'its vocabulary idx2word holds {describe_value(not_words[0])}, which is not a word.')
    if len(words) != ntoken:
        raise ValueError(f'its vocabulary has {len(words)} words but its model has {ntoken}.')
    if type(padding) is not list:
        raise ValueError(f'its vocabulary padding is {describe_value(padding)}, not a list of word indices.')
    not_indices = [i for i in padding if not is_int(i, 0, ntoken - 1)]
    if not_indices:
        raise ValueError(f'its vocabulary padding holds {describe_value(not_indices[0])}, '
                         f'which is not a word index from 0 to {ntoken - 1}.')
    if len(set(padding)) != len(padding):
        raise ValueError('its vocabulary padding lists a word twice.')
    if len(padding) == ntoken:
        raise ValueError('every word of its vocabulary is padding, so there is no word to generate.')


def describe_error(e):
    """The first two lines of an exception's message on one line (load_state_dict puts the detail second)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return ' '.join(lines[:2]) or type(e).__name__


# --resume continues the saved run exactly, so every flag must be as it was saved, except these,
# which change neither the model nor the numbers it computes.
RESUME_MAY_CHANGE = ('epochs', 'save', 'log_interval', 'data', 'cuda', 'accel', 'resume', 'onnx_export', 'size')


def may_change_flags():
    """RESUME_MAY_CHANGE as the user types the flags: '--epochs, ... and --onnx-export' (--resume goes without
    saying; --size only names the values of other flags, which are compared)."""
    flags = [flag_name(dest) for dest in RESUME_MAY_CHANGE if dest not in ('resume', 'size')]
    return ', '.join(flags[:-1]) + ' and ' + flags[-1]


def flag_name(dest):
    """The flag as the user types it (only --batch_size keeps pytorch/examples' underscore)."""
    return '--' + (dest if dest == 'batch_size' else dest.replace('_', '-'))


def rng_state(device):
    """This process's random number generator states: the CPU's, and its CUDA device's (or None)."""
    return {'cpu': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state(device) if device.type == 'cuda' else None}


def save_resume(path, model, dictionary, args, recipe, progress, rng_states):
    """SAVE.resume: the best-model fields, plus the recipe's state, the loop's progress and the RNGs
    (rng_states: rng_state() of each process, one under torchrun's every rank)."""
    ckpt = model_checkpoint(model, dictionary, args, progress['best_val_loss'])
    ckpt['resume'] = {'progress': progress, 'recipe': recipe.name, 'recipe_state': recipe.state_dict(),
                      'rng': rng_states}
    save(ckpt, path)


def load_resume_flags(path):
    """The flags saved in the resume checkpoint at path (a dict of flag names, as argparse calls them, and values)."""
    ckpt = load(path)
    if 'resume' not in ckpt:
        raise CannotResume(f'{path} is a best-model checkpoint, not a resume checkpoint (those are named SAVE.resume).')
    flags = ckpt.get('args')
    if not (isinstance(flags, dict) and all(isinstance(name, str) for name in flags)):
        raise CheckpointError(f'{path} is damaged or incompatible: its flags are not a dict of names and values.')
    return flags


def load_resume(path, model, dictionary, args, recipe, progress_fields, nbatches, rank=0, world_size=1):
    """Restore the model, the recipe and the RNGs (rank's, of world_size processes) from SAVE.resume;
    returns the loop's progress.

    Every field is checked before anything is restored: the flags against the saved ones, the
    progress (progress_fields, its keys) against the nbatches batches of an epoch and the model.
    """
    ckpt = load(path)
    if 'resume' not in ckpt:
        raise CannotResume(f'{path} is a best-model checkpoint, not a resume checkpoint (those are named SAVE.resume).')
    try:
        saved_args, saved_words, state = ckpt['args'], ckpt['vocab']['idx2word'], ckpt['resume']
        stored = state.get('progress')
        if isinstance(stored, dict):
            # Fields added since: a file written before has none, and still resumes.
            stored = {**{k: v for k, v in LATER_PROGRESS_FIELDS.items() if k in progress_fields}, **stored}
        if not isinstance(stored, dict) or set(stored) != set(progress_fields):
            raise CannotResume(f'{path} was written by another version of this example and cannot be resumed.')
        now = vars(args)  # a flag one script lacks (--dynamic-loss-scale) is off there
        # --nhead means nothing to an RNN, whose runs saved before the flag existed do not hold it.
        may_change = RESUME_MAY_CHANGE + (('nhead',) if args.model != 'Transformer' else ())
        differences = [f'{flag_name(key)} was {saved_args.get(key, False)}, now {now.get(key, False)}'
                       for key in sorted(set(saved_args) | set(now))
                       if key not in may_change and saved_args.get(key, False) != now.get(key, False)]
        rule = (f' (a resumed run continues the saved one exactly: only {may_change_flags()} may change)'
                if differences else '')
        if saved_words != dictionary.idx2word:
            differences.append(vocabulary_difference(saved_words, dictionary.idx2word))
        if not differences and state['recipe'] != recipe.name:
            differences.append(f"the precision recipe was {state['recipe']}, now {recipe.name}")
        if differences:
            raise CannotResume(f'cannot resume from {path}: ' + '; '.join(differences) + rule + '.')
        progress = stored
        check_progress(progress, nbatches, model.init_hidden(args.batch_size))
        rngs = state['rng']
        if not (isinstance(rngs, list) and all(isinstance(r, dict) and isinstance(r['cpu'], torch.Tensor) for r in rngs)):
            raise ValueError('the saved random number generator states are not tensors')
        if len(rngs) != world_size:
            raise CannotResume(f'cannot resume from {path}: it was saved by {len(rngs)} process(es) and this run has '
                               f'{world_size} (each continues its own random numbers); resume with {len(rngs)}.')
        device = next(model.parameters()).device
        model.load_state_dict(ckpt['model'])
        recipe.load_state_dict(state['recipe_state'])
        torch.set_rng_state(rngs[rank]['cpu'])
        if device.type == 'cuda' and rngs[rank]['cuda'] is not None:
            torch.cuda.set_rng_state(rngs[rank]['cuda'], device)
        hidden = progress['hidden']
        if hidden is not None:
            progress['hidden'] = tuple(h.to(device) for h in hidden) if isinstance(hidden, tuple) else hidden.to(device)
    except CONTENT_ERRORS as e:
        raise CheckpointError(f'{path} is damaged or incompatible: {describe_error(e)}') from None
    return progress


def vocabulary_difference(saved, now):
    """How the vocabulary of --data differs from the saved one."""
    if len(saved) == len(now) and sorted(map(str, saved)) == sorted(now):
        first = next(i for i, (a, b) in enumerate(zip(saved, now)) if a != b)
        return (f'the vocabulary holds the same {len(now)} words in another order (word {first} was {saved[first]!r}, '
                f'now {now[first]!r}): the words must first appear in --data in the same order')
    return f'the vocabulary differs ({len(saved)} words saved, {len(now)} in --data)'


# Progress fields that SAVE.resume files written before they existed lack, with the value such a file means:
# metrics_sha256 None, the metrics file known by its length alone.
LATER_PROGRESS_FIELDS = {'metrics_sha256': None}


def check_progress(progress, nbatches, initial_hidden):
    """Raise ValueError naming the first saved progress field a run could not continue from."""
    def is_number(x, low=0.0):
        return type(x) is float and math.isfinite(x) and x >= low

    p = progress
    checks = {
        'epoch': is_int(p['epoch'], 1),
        'next_batch': is_int(p['next_batch'], 0, nbatches - 1),
        'best_val_loss': p['best_val_loss'] is None or is_number(p['best_val_loss']),
        'skipped': is_int(p['skipped'], 0),
        'epoch_skipped': is_int(p['epoch_skipped'], 0, p['skipped'] if is_int(p['skipped'], 0) else 0),
        'line_start': is_int(p['line_start'], 0, p['next_batch'] if is_int(p['next_batch'], 0) else 0),
        'line_loss': is_number(p['line_loss']),
        'line_tokens': is_int(p['line_tokens'], 0),
        'line_seconds': is_number(p['line_seconds']),
        'elapsed': is_number(p['elapsed']),
        'metrics_bytes': is_int(p['metrics_bytes'], 0),
        'metrics_sha256': p.get('metrics_sha256') is None or isinstance(p['metrics_sha256'], str),
        # An RNN run carries a state from batch 1 on; a Transformer (initial_hidden None) never has one.
        'hidden': ((p['hidden'] is None) == (p['next_batch'] == 0 or initial_hidden is None)
                   and same_shapes(p['hidden'], initial_hidden)),
    }
    for field, ok in checks.items():
        if not ok:
            raise ValueError(f'its progress field {field} is {describe_value(p[field])}, which this run cannot continue from.')


def same_shapes(hidden, initial):
    """hidden is None, or floating-point tensors shaped like the model's initial hidden state."""
    if hidden is None:
        return True
    if isinstance(initial, tuple):
        return (isinstance(hidden, tuple) and len(hidden) == len(initial)
                and all(same_shapes(h, i) for h, i in zip(hidden, initial)))
    return isinstance(hidden, torch.Tensor) and hidden.is_floating_point() and hidden.shape == initial.shape


def describe_value(x):
    if isinstance(x, torch.Tensor):
        return f'a {x.dtype} tensor of shape {tuple(x.shape)}'
    if isinstance(x, (tuple, list)):
        return f'a {type(x).__name__} of {len(x)} items'
    return repr(x)[:60]
