"""plumbing/checkpoint.py: unusable and hostile checkpoints refused in one sentence; SAVE.resume's validation and round trip."""
import argparse
import dataclasses
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

import data
import recipes
from conftest import ENV, NTOKEN, REPO, SMALL, assert_unchanged, describe, end_line, error_line, snapshot
from model import RNNModel, build_model
from plumbing import checkpoint, errors, session
from plumbing.session import Line, Progress


def test_save_resume_round_trip(tmp_path):
    """load_resume restores the model, the recipe's state, the RNG and the loop's progress as saved."""
    torch.manual_seed(0)
    model = RNNModel('LSTM', NTOKEN, 8, 8, 1, dropout=0.0)
    dictionary = data.Dictionary()
    for i in range(NTOKEN):
        dictionary.add_word(f'w{i}')
    args = argparse.Namespace(model='LSTM', emsize=8, nhid=8, nlayers=1, tied=False, batch_size=2, bptt=3,
                              fp16=False, amp=True, bf16=False)
    recipe = recipes.AutocastRecipe(model, 0.5, 1.0, torch.float16)
    recipe.scaler.scale(torch.ones(()))  # (GradScaler makes its scale on first use)
    recipe.scaler.update(1024.0)
    hidden = model.init_hidden(2)
    saved = {**dataclasses.asdict(Progress(epoch=3, next_batch=4, hidden=hidden, best_val_loss=2.5, skipped=7,
                                           epoch_skipped=2)),
             **dataclasses.asdict(Line(line_start=2, line_loss=9.25, line_tokens=12, line_seconds=0.5)),
             'elapsed': 1.5, 'metrics_bytes': 10}
    path = str(tmp_path / 'model.pt.resume')
    checkpoint.save_resume(path, model, dictionary, args, recipe, saved, [checkpoint.rng_state(torch.device('cpu'))])
    rng_after_save = torch.get_rng_state()
    expected_draw = torch.rand(3)

    torch.manual_seed(1)
    other = RNNModel('LSTM', NTOKEN, 8, 8, 1, dropout=0.0)
    other_recipe = recipes.AutocastRecipe(other, 2.0, 1.0, torch.float16)
    fields = list(saved)
    restored = checkpoint.load_resume(path, other, dictionary, args, other_recipe, fields, nbatches=5)
    assert torch.equal(torch.get_rng_state(), rng_after_save) and torch.equal(torch.rand(3), expected_draw)
    assert restored.keys() == saved.keys()
    assert {k: v for k, v in restored.items() if k != 'hidden'} == {k: v for k, v in saved.items() if k != 'hidden'}
    assert all(torch.equal(a, b) for a, b in zip(restored['hidden'], hidden))
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))
    assert other_recipe.loss_scale == 1024.0 and other_recipe.optimizer.param_groups[0]['lr'] == 0.5
    ckpt = checkpoint.load(path)
    assert ckpt['resume']['recipe'] == 'amp' and ckpt['best_val_loss'] == 2.5

    # the same flags with another recipe: refused, with both short names
    bf16 = recipes.AutocastRecipe(other, 0.5, 1.0, torch.bfloat16)
    with pytest.raises(errors.CannotResume, match=r'the precision recipe was amp, now bf16\.$'):
        checkpoint.load_resume(path, other, dictionary, args, bf16, fields, nbatches=5)


def test_transformer_progress_never_holds_a_hidden_state():
    """check_progress: a Transformer run (initial hidden None) resumes mid-epoch with hidden None, never a tensor."""
    progress = {**dataclasses.asdict(session.Progress(next_batch=5)), **dataclasses.asdict(session.Line(line_start=5)),
                'elapsed': 0.0, 'metrics_bytes': 0}
    checkpoint.check_progress(progress, nbatches=38, initial_hidden=None)
    progress['hidden'] = torch.zeros(2, 8, 16)
    with pytest.raises(ValueError, match='its progress field hidden is a torch.float32 tensor'):
        checkpoint.check_progress(progress, nbatches=38, initial_hidden=None)

NWORDS, WIDTH = 13, 8  # 13 words padded to 16; embedding and hidden width 8
INFLATED = 256 * 2 ** 20  # what the deflated member inflates to (the file stays under 1 MB)


def tiny_checkpoint(nlayers=2, tie_weights=False, rnn_type='LSTM', nhead=2):
    """A best-model checkpoint of an untrained model over 16 words, 3 of them padding (nhead: the Transformer's)."""
    dictionary = data.Dictionary()
    for i in range(NWORDS):
        dictionary.add_word(f'w{i}')
    dictionary.pad_to_multiple_of(8)
    model = build_model(rnn_type, len(dictionary), WIDTH, WIDTH, nlayers, dropout=0.0, tie_weights=tie_weights,
                        nhead=nhead)
    args = argparse.Namespace(model=rnn_type, emsize=WIDTH, nhid=WIDTH, nlayers=nlayers, tied=tie_weights, nhead=nhead)
    return checkpoint.model_checkpoint(model, dictionary, args, best_val_loss=5.0)


def flattened_checkpoint():
    """The RNN's weights as views of one storage, as cuDNN's flattened weights are saved from a GPU."""
    ckpt = tiny_checkpoint()
    names = [name for name in ckpt['model'] if name.startswith('rnn.')]
    flat = torch.cat([ckpt['model'][name].flatten() for name in names])
    offset = 0
    for name in names:
        shape = ckpt['model'][name].shape
        ckpt['model'][name] = flat[offset:offset + shape.numel()].view(shape)
        offset += shape.numel()
    return ckpt


def changed(ckpt, part, **changes):
    ckpt[part].update(changes)
    return ckpt


def with_vocab(**changes):
    return changed(tiny_checkpoint(), 'vocab', **changes)


def with_args(**changes):
    return changed(tiny_checkpoint(), 'model_args', **changes)


def transformer_with_args(*removed, **changes):
    ckpt = changed(tiny_checkpoint(rnn_type='Transformer'), 'model_args', **changes)
    for name in removed:
        del ckpt['model_args'][name]
    return ckpt


def transformer_without_weight(name):
    ckpt = tiny_checkpoint(rnn_type='Transformer')
    del ckpt['model'][name]
    return ckpt


def with_weights(**changes):
    ckpt = tiny_checkpoint()
    ckpt['model'].update({name.replace('__', '.'): value for name, value in changes.items()})
    return ckpt


def stride_0_model(ntoken=10 ** 6, rnn_type='LSTM'):
    """ntoken 10**6, shapes and all, but every matrix that grows with it is one float seen many times."""
    ckpt = changed(tiny_checkpoint(rnn_type=rnn_type), 'model_args', ntoken=ntoken)
    for name, tensor in ckpt['model'].items():
        if name.startswith(('encoder.', 'decoder.')):
            ckpt['model'][name] = torch.zeros(1).expand(ntoken, *tensor.shape[1:])
    return ckpt


def layers_sharing_a_matrix():
    """Two weights of layer 1 that are one tensor: the model built would need more than the file holds."""
    ckpt = tiny_checkpoint()
    ckpt['model']['rnn.weight_ih_l1'] = ckpt['model']['rnn.weight_hh_l1']
    return ckpt


def vocabulary_of(ckpt, words):
    ckpt['vocab']['idx2word'] = words
    return ckpt


HOSTILE = {  # name: (the checkpoint, what the error line must say)
    'nlayers-200000': (lambda: with_args(nlayers=200000), r'nlayers 200000 but its weights hold 2 RNN layers'),
    'ntoken-1000000': (lambda: with_args(ntoken=10 ** 6),
                       r'ntoken 1000000 but its weight encoder\.weight is a torch\.float32 tensor of shape \(16, 8\)'),
    'ninp-disagrees': (lambda: with_args(ninp=4096), r'ninp 4096 but its weight encoder\.weight'),
    'nhid-disagrees': (lambda: with_args(nhid=4096), r'nhid 4096 but its weight rnn\.weight_hh_l0'),
    'nlayers-string': (lambda: with_args(nlayers='2'), r"model_args hold nlayers '2', which RNNModel cannot take"),
    'nlayers-bool': (lambda: changed(tiny_checkpoint(nlayers=1), 'model_args', nlayers=True), r'nlayers True,'),
    'ntoken-zero': (lambda: with_args(ntoken=0), r'ntoken 0,'),
    'dropout-nan': (lambda: with_args(dropout=float('nan')), r'dropout nan,'),
    'dropout-one': (lambda: with_args(dropout=1.0), r'dropout 1\.0,'),
    'rnn-type-unknown': (lambda: with_args(rnn_type='LSTM2'), r"rnn_type 'LSTM2',"),
    'tie-weights-int': (lambda: with_args(tie_weights=0), r'tie_weights 0,'),
    'model-args-extra': (lambda: with_args(bidirectional=True), r"model_args are not RNNModel's arguments"),
    'weights-stride-0': (stride_0_model, r'its weights claim \d+ bytes but the file holds only \d+ bytes'),
    'weights-share-a-matrix': (layers_sharing_a_matrix, r'its weights claim \d+ bytes but the file holds only \d+'),
    'weight-not-a-tensor': (lambda: with_weights(decoder__bias=[0.0] * 16), r"its weight 'decoder\.bias' is a list"),
    'weight-integer': (lambda: with_weights(decoder__bias=torch.zeros(16, dtype=torch.int64)),
                       r"its weight 'decoder\.bias' is a torch\.int64 tensor"),
    'weight-meta': (lambda: with_weights(decoder__bias=torch.zeros(16, device='meta')),
                    r"its weight 'decoder\.bias' is a torch\.float32 tensor of shape \(16,\), not a dense"),
    'weight-unexpected': (lambda: with_weights(extra__weight=torch.zeros(2)),
                          r'its weight extra\.weight is .*, but its model_args need no such weight'),
    'vocab-all-padding': (lambda: with_vocab(padding=list(range(16))), r'every word of its vocabulary is padding'),
    'padding-string': (lambda: with_vocab(padding='13,14,15'), r"padding is '13,14,15', not a list of word indices"),
    'padding-out-of-range': (lambda: with_vocab(padding=[13, 16]),
                             r'padding holds 16, which is not a word index from 0 to 15'),
    'padding-negative': (lambda: with_vocab(padding=[-1]), r'padding holds -1,'),
    'padding-bool': (lambda: with_vocab(padding=[True]), r'padding holds True,'),
    'padding-twice': (lambda: with_vocab(padding=[13, 13]), r'padding lists a word twice'),
    'idx2word-non-string': (lambda: vocabulary_of(tiny_checkpoint(), ['w0', 1] + [f'x{i}' for i in range(14)]),
                            r'idx2word holds 1, which is not a word'),
    'idx2word-too-short': (lambda: vocabulary_of(tiny_checkpoint(), [f'w{i}' for i in range(15)]),
                           r'its vocabulary has 15 words but its model has 16'),
    'idx2word-a-string': (lambda: vocabulary_of(tiny_checkpoint(), 'w' * 16), r"idx2word is 'w+', not a list of words"),
    'transformer-nlayers-200000': (lambda: transformer_with_args(nlayers=200000),
                                   r'nlayers 200000 but its weights hold 2 Transformer layers'),
    'transformer-nhid-disagrees': (lambda: transformer_with_args(nhid=4096),
                                   r'nhid 4096 but its weight transformer\.layers\.0\.linear1\.weight'),
    'transformer-nhead-string': (lambda: transformer_with_args(nhead='2'),
                                 r"model_args hold nhead '2', which TransformerModel cannot take"),
    'transformer-nhead-zero': (lambda: transformer_with_args(nhead=0), r'nhead 0,'),
    'transformer-nhead-not-dividing-ninp': (lambda: transformer_with_args(nhead=3), r'nhead 3,'),
    'transformer-nhead-missing': (lambda: transformer_with_args('nhead'), r"model_args are not TransformerModel's"),
    'rnn-with-nhead': (lambda: with_args(nhead=2), r"model_args are not RNNModel's arguments"),
    'lstm-weights-called-transformer': (lambda: with_args(rnn_type='Transformer', nhead=2),
                                        r'nlayers 2 but its weights hold 0 Transformer layers'),
    'transformer-weight-missing': (lambda: transformer_without_weight('transformer.layers.1.norm2.bias'),
                                   r'its weight transformer\.layers\.1\.norm2\.bias is missing, but its model_args'),
    'transformer-weights-stride-0': (lambda: stride_0_model(rnn_type='Transformer'),
                                     r'its weights claim \d+ bytes but the file holds only \d+ bytes'),
}


def generate(call_script, path):
    return call_script('generate.py', '--checkpoint', path.name, '--outf', 'out.txt', '--words', 30, cwd=path.parent)


@pytest.mark.parametrize('kind', list(HOSTILE))
def test_generate_refuses_hostile_checkpoint(kind, tmp_path, call_script):
    make, expected = HOSTILE[kind]
    checkpoint.save(make(), str(tmp_path / 'bad.pt'))
    line = error_line(generate(call_script, tmp_path / 'bad.pt'), 'generate.py', 1)
    assert re.search(rf'bad\.pt is damaged or incompatible: .*{expected}', line), line
    assert not (tmp_path / 'out.txt').exists()


VALID = {
    'lstm': tiny_checkpoint,
    'lstm-tied': lambda: tiny_checkpoint(tie_weights=True),
    'lstm-flattened': flattened_checkpoint,
    'gru-1-layer': lambda: tiny_checkpoint(nlayers=1, rnn_type='GRU'),
    'rnn-relu-3-layers': lambda: tiny_checkpoint(nlayers=3, rnn_type='RNN_RELU'),
    'transformer': lambda: tiny_checkpoint(rnn_type='Transformer'),
    'transformer-tied-1-layer-4-heads': lambda: tiny_checkpoint(nlayers=1, tie_weights=True, rnn_type='Transformer',
                                                               nhead=4),
}


@pytest.mark.parametrize('kind', list(VALID))
def test_valid_checkpoint_still_generates(kind, tmp_path, call_script):
    ckpt = VALID[kind]()
    checkpoint.save(ckpt, str(tmp_path / 'model.pt'))
    proc = generate(call_script, tmp_path / 'model.pt')
    assert proc.returncode == 0, proc.stderr
    words = (tmp_path / 'out.txt').read_text().split()
    assert len(words) == 30 and set(words) <= {f'w{i}' for i in range(NWORDS)}
    model, idx2word, padding = checkpoint.load_model(str(tmp_path / 'model.pt'))
    assert idx2word == ckpt['vocab']['idx2word'] and padding == [13, 14, 15]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ckpt['model'][name]), name


# ---------------------------------------------------------------- the zip archive

def rewrite_archive(src, dest, deflate=None, pad_to=0):
    """Copy src's members into a new zip at dest; the member named deflate is deflated and padded
    with zeros to pad_to bytes (deflate compresses zeros about a thousandfold)."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dest, 'w') as new:
        for member in old.infolist():
            info = zipfile.ZipInfo(member.filename, member.date_time)
            if member.filename != deflate:
                new.writestr(info, old.read(member))
                continue
            info.compress_type = zipfile.ZIP_DEFLATED
            blob = old.read(member)
            with new.open(info, 'w') as f:
                f.write(blob)
                for start in range(len(blob), pad_to, 2 ** 20):
                    f.write(bytes(min(2 ** 20, pad_to - start)))


def largest_storage(path):
    """The ZipInfo of the biggest tensor record in a torch.save zip."""
    with zipfile.ZipFile(path) as archive:
        return max((m for m in archive.infolist() if '/data/' in m.filename), key=lambda m: m.file_size)


@pytest.fixture(scope='module')
def inflating_checkpoint(tmp_path_factory):
    """A tiny best-model checkpoint whose biggest tensor record is deflated and inflates to INFLATED bytes."""
    directory = tmp_path_factory.mktemp('inflating')
    good = directory / 'good.pt'
    checkpoint.save(tiny_checkpoint(), str(good))
    bomb = directory / 'bomb.pt'
    rewrite_archive(good, bomb, deflate=largest_storage(good).filename, pad_to=INFLATED)
    assert bomb.stat().st_size < 2 ** 20
    return bomb


def test_generate_refuses_inflating_member(inflating_checkpoint, tmp_path, call_script):
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(inflating_checkpoint.read_bytes())
    line = error_line(generate(call_script, bad), 'generate.py', 1)
    assert re.search(r'bad\.pt is not a checkpoint written by torch\.save \(member \S+/data/\d+ is compressed',
                     line), line


def test_resume_refuses_inflating_member(inflating_checkpoint, tmp_path, call_script, corpus_dir):
    """The check is in checkpoint.load, which load_resume reads SAVE.resume with."""
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(inflating_checkpoint.read_bytes())
    proc = call_script('main.py', '--data', corpus_dir, '--emsize', WIDTH, '--nhid', WIDTH, '--epochs', 1,
                       '--resume', 'bad.pt', cwd=tmp_path)
    line = error_line(proc, 'main.py', 1)
    assert 'bad.pt is not a checkpoint written by torch.save' in line and 'is compressed' in line, line


MEASURE_LOAD = textwrap.dedent('''
    import resource, sys
    from plumbing import checkpoint, errors
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        checkpoint.load_model(sys.argv[1])
    except errors.CheckpointError as e:
        print(e)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)  # KiB -> MiB
''')


def test_inflating_member_is_refused_without_inflating_it(inflating_checkpoint):
    """Peak memory, in a process of its own: the member is refused from the zip's directory, unread
    (torch.load would inflate all INFLATED bytes of it before finding that they do not fit)."""
    proc = subprocess.run([sys.executable, '-c', MEASURE_LOAD, str(inflating_checkpoint)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, **ENV))
    assert proc.returncode == 0, proc.stderr
    sentence, grown_mib = proc.stdout.splitlines()
    assert int(grown_mib) < 100, f'peak memory grew by {grown_mib} MiB to refuse the file ({sentence})'
    assert 'is compressed' in sentence, sentence


def central_directory(blob):
    """(offset of the central directory, its entries as (name, bytes)) of a zip zipfile wrote (no zip64, no comment)."""
    _, _, _, count, _, size, offset, _ = struct.unpack('<4s4H2LH', blob[-22:])
    entries, at = [], offset
    for _ in range(count):
        name_len, extra_len, comment_len = struct.unpack('<3H', blob[at + 28:at + 34])
        end = at + 46 + name_len + extra_len + comment_len
        entries.append((blob[at + 46:at + 46 + name_len].decode(), blob[at:end]))
        at = end
    return offset, entries


def with_central_directory(blob, offset, entries):
    directory = b''.join(entry for _, entry in entries)
    return blob[:offset] + directory + struct.pack('<4s4H2LH', b'PK\x05\x06', 0, 0, len(entries), len(entries),
                                                   len(directory), offset, 0)


def claim_huge_member(blob, name):
    """The member declares 2 GiB, stored, in a file of a few KiB: torch.load would allocate that much to read it."""
    offset, entries = central_directory(blob)
    entries = [(n, e[:20] + struct.pack('<2L', 2 ** 31, 2 ** 31) + e[28:] if n == name else e) for n, e in entries]
    return with_central_directory(blob, offset, entries)


def repeat_member(blob, name, times):
    """More directory entries for one member, all pointing at its bytes: the members hold more than the file."""
    offset, entries = central_directory(blob)
    entries += [next(entry for entry in entries if entry[0] == name)] * times
    return with_central_directory(blob, offset, entries)


@pytest.mark.parametrize('kind', ['member-claims-2-GiB', 'member-repeated'])
def test_generate_refuses_members_larger_than_the_file(kind, tmp_path, call_script):
    good, stored = tmp_path / 'good.pt', tmp_path / 'stored.pt'
    checkpoint.save(tiny_checkpoint(), str(good))
    rewrite_archive(good, stored)  # the same members, in a zip with a plain directory to edit
    blob, member = stored.read_bytes(), largest_storage(stored)
    if kind == 'member-claims-2-GiB':
        blob = claim_huge_member(blob, member.filename)
    else:
        blob = repeat_member(blob, member.filename, len(blob) // member.file_size + 1)
    (tmp_path / 'bad.pt').write_bytes(blob)
    line = error_line(generate(call_script, tmp_path / 'bad.pt'), 'generate.py', 1)
    assert re.search(r'bad\.pt is corrupt \(its member \S+ declares more bytes than the file holds', line), line


def test_rewritten_archive_still_loads(tmp_path):
    """The crafted files above differ from a good one only in what each test changes."""
    good, stored = tmp_path / 'good.pt', tmp_path / 'stored.pt'
    checkpoint.save(tiny_checkpoint(), str(good))
    rewrite_archive(good, stored)
    blob = stored.read_bytes()
    assert with_central_directory(blob, *central_directory(blob)) == blob
    checkpoint.load_model(str(stored))


def tamper(path, change):
    ckpt = checkpoint.load(str(path))
    change(ckpt['resume'])
    torch.save(ckpt, path)


TAMPERED = {  # what is changed in SAVE.resume's 'resume' dict: the line names the field
    'epoch': lambda r: r['progress'].update(epoch=-1),
    'next_batch': lambda r: r['progress'].update(next_batch=10 ** 12),
    'best_val_loss': lambda r: r['progress'].update(best_val_loss='low'),
    'hidden': lambda r: r['progress'].update(hidden=tuple(h[:, :1] for h in r['progress']['hidden'])),
    'skipped': lambda r: r['progress'].update(skipped=True),
    'line_seconds': lambda r: r['progress'].update(line_seconds=float('nan')),
    'rng': lambda r: r.update(rng='seed'),
    'recipe_state': lambda r: r.update(recipe_state={'optimizer': []}),
}


@pytest.mark.parametrize('field', list(TAMPERED))
def test_resume_refuses_a_tampered_field_before_training(field, tmp_path, call_script, corpus_dir, stopped_run):
    shutil.copy(stopped_run / 'model.pt.resume', tmp_path / 'model.pt.resume')
    tamper(tmp_path / 'model.pt.resume', TAMPERED[field])
    proc = call_script('main.py', '--data', corpus_dir, *SMALL, '--epochs', 2, '--resume', 'model.pt.resume',
                       cwd=tmp_path)
    line = error_line(proc, 'main.py', 1)
    assert line.startswith('main.py: error: model.pt.resume is damaged or incompatible: '), line
    if field in {*session.Progress.__dataclass_fields__, *session.Line.__dataclass_fields__}:
        assert f'its progress field {field} is ' in line, line
    assert '| epoch' not in proc.stdout


class CodeOnLoad:
    """Unpickling this calls fn(*args): what a malicious checkpoint does."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def write_code_payload(kind, dest, marker):
    fn, args = (os.system, (f'touch {shlex.quote(str(marker))}',)) if kind == 'code-system' else (open, (str(marker), 'w'))
    torch.save({'format': checkpoint.FORMAT, 'model': CodeOnLoad(fn, args)}, dest)


def write_bad_checkpoint(kind, base, dest, marker):
    """A checkpoint at dest that cannot be used, made from the good one at base."""
    if kind.startswith('code-'):
        write_code_payload(kind, dest, marker)
    elif kind == 'truncated':
        blob = base.read_bytes()
        dest.write_bytes(blob[:len(blob) // 2])
    elif kind == 'corrupt':
        blob = bytearray(base.read_bytes())
        mid = len(blob) // 2
        for i in range(mid, mid + 64):
            blob[i] ^= 0xFF
        dest.write_bytes(bytes(blob))
    elif kind == 'text':
        dest.write_text('this is a text file, not a checkpoint\n')
    elif kind == 'plain-dict':
        torch.save({'model': {}, 'vocab': {'idx2word': []}}, dest)
    else:
        ckpt = checkpoint.load(str(base))
        if kind == 'weights-mismatch':
            w = ckpt['model']['encoder.weight']
            ckpt['model']['encoder.weight'] = torch.zeros(w.shape[0] + 8, w.shape[1], dtype=w.dtype)
        elif kind == 'missing-weight':
            del ckpt['model']['decoder.bias']
        elif kind == 'model-args-mismatch':
            ckpt['model_args']['nhid'] *= 2
        elif kind == 'missing-vocab':
            del ckpt['vocab']
        elif kind == 'weights-not-a-dict':
            ckpt['model'] = [1, 2, 3]
        else:
            raise ValueError(kind)
        torch.save(ckpt, dest)


REFUSED_CODE = 'refused because loading it could run code'
BAD_CHECKPOINTS = {  # kind: what the error line must say
    'code-system': REFUSED_CODE,
    'code-open': REFUSED_CODE,
    'truncated': r'truncated|corrupt',
    'corrupt': r'corrupt|damaged',
    'text': r'corrupt|not a PyTorch checkpoint',
    'plain-dict': r'not a checkpoint written by this example',
    'weights-mismatch': r'damaged or incompatible',
    'missing-weight': r'damaged or incompatible',
    'model-args-mismatch': r'damaged or incompatible',
    'missing-vocab': r'damaged or incompatible',
    'weights-not-a-dict': r'damaged or incompatible',
}


def test_resume_refuses_an_earlier_versions_resume_file(tmp_path, call_script, corpus_dir, resume_checkpoint):
    """SAVE.resume as the version before the recipes wrote it (epoch, batch and update step at the top):
    a sound checkpoint this version cannot continue, a usage error."""
    ckpt = checkpoint.load(str(resume_checkpoint))
    progress = ckpt['resume']['progress']
    ckpt['resume'] = {'epoch': progress['epoch'], 'next_batch': 0, 'hidden': None, 'step': {'recipe': 'fp32'},
                      'rng': ckpt['resume']['rng'], 'cuda_rng': []}
    torch.save(ckpt, tmp_path / 'old.pt.resume')
    before = snapshot(tmp_path)
    proc = call_script('main.py', '--data', corpus_dir, *SMALL, '--epochs', 5, '--resume', 'old.pt.resume', cwd=tmp_path)
    line = error_line(proc, 'main.py', 2)
    assert 'old.pt.resume was written by another version of this example and cannot be resumed.' in line, line
    assert '| epoch' not in proc.stdout
    assert_unchanged(before, tmp_path)


def test_resume_without_the_best_model_file(tmp_path, call_script, corpus_dir, resume_checkpoint):
    """SAVE.resume copied alone to another directory (its run has finished 2 epochs): --resume with
    --epochs 2 has nothing left to train and tests. The best model (SAVE) is not there: that must give a
    clean result (test the resumed weights) or one clear line naming it, not a traceback."""
    shutil.copy(resume_checkpoint, tmp_path / 'model.pt.resume')
    before = snapshot(tmp_path)
    proc = call_script('main.py', '--data', corpus_dir, *SMALL, '--epochs', 2, '--resume', 'model.pt.resume', cwd=tmp_path)
    assert 'Traceback' not in proc.stderr, describe(proc)
    if proc.returncode == 0:
        end_line(proc.stdout)
    else:
        line = error_line(proc, 'main.py', proc.returncode)
        assert 'model.pt' in line, line
        assert_unchanged(before, tmp_path)


# ---------------------------------------------------------------- checkpoints that cannot be used

@pytest.mark.parametrize('kind', ['code-system', 'code-open'])
def test_code_payloads_are_live(kind, tmp_path):
    """The payload files below do run code when loaded without weights_only: the refusal tests mean something."""
    marker = tmp_path / 'MARKER'
    write_code_payload(kind, tmp_path / 'evil.pt', marker)
    assert not marker.exists()
    torch.load(tmp_path / 'evil.pt', weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize('kind', list(BAD_CHECKPOINTS))
def test_generate_refuses_unusable_checkpoint(kind, tmp_path, call_script, case_dir):
    (case_dir / 'out.txt').write_text('earlier output\n')
    marker = tmp_path / 'MARKER'
    write_bad_checkpoint(kind, case_dir / 'model.pt', case_dir / 'bad.pt', marker)
    before = snapshot(tmp_path)
    proc = call_script('generate.py', '--checkpoint', 'bad.pt', '--outf', 'out.txt', '--words', 30, cwd=case_dir)
    line = error_line(proc, 'generate.py', 1)
    assert 'bad.pt' in line, line
    assert re.search(BAD_CHECKPOINTS[kind], line), line
    assert not marker.exists()
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize('kind', [k for k in BAD_CHECKPOINTS if k != 'model-args-mismatch'])
def test_resume_refuses_unusable_checkpoint(kind, tmp_path, call_script, corpus_dir, case_dir, resume_checkpoint):
    marker = tmp_path / 'MARKER'
    write_bad_checkpoint(kind, resume_checkpoint, case_dir / 'bad.pt', marker)
    before = snapshot(tmp_path)
    proc = call_script('main.py', '--data', corpus_dir, *SMALL, '--epochs', 5, '--resume', 'bad.pt', cwd=case_dir)
    line = error_line(proc, 'main.py', 1)
    assert 'bad.pt' in line, line
    assert re.search(BAD_CHECKPOINTS[kind], line), line
    assert not marker.exists()
    assert '| epoch' not in proc.stdout
    assert_unchanged(before, tmp_path)
