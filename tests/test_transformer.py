"""--model Transformer: its flags, every precision recipe end to end with generate.py, and --resume."""
import dataclasses
import os
import re
import signal

import pytest
import torch
from test_robustness import end_line, progress_by_epoch, weights_equal

import recipes
import training
from conftest import describe, error_line
from main import ManualFP16Recipe
from main_fp16_optimizer import FP16OptimizerRecipe
from model import TransformerModel
from plumbing import checkpoint, session

TRANSFORMER = ['--model', 'Transformer', '--emsize', 16, '--nhid', 32, '--nhead', 2, '--nlayers', 2,
               '--batch_size', 8, '--bptt', 10, '--log-interval', 5, '--lr', 5, '--save', 'model.pt']
LOSS_RE = re.compile(r'^\| epoch +\d+ \| .*\| loss +(\d+\.\d+) \|', re.M)

RECIPES = {  # the recipe's name: (script, flags)
    'fp32': ('main.py', []),
    'fp16-manual': ('main.py', ['--fp16']),
    'fp16-optimizer-static': ('main_fp16_optimizer.py', ['--fp16']),
    'fp16-optimizer-dynamic': ('main_fp16_optimizer.py', ['--fp16', '--dynamic-loss-scale']),
    'amp': ('main.py', ['--amp']),
    'bf16': ('main.py', ['--bf16']),
}


@pytest.mark.parametrize('recipe', list(RECIPES))
def test_every_recipe_trains_a_transformer_that_generates(recipe, corpus_dir, tmp_path, call_script):
    script, flags = RECIPES[recipe]
    proc = call_script(script, '--data', corpus_dir, *TRANSFORMER, '--dropout', 0, '--epochs', 1, *flags, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    losses = [float(x) for x in LOSS_RE.findall(proc.stdout)]
    assert len(losses) >= 7 and losses[-1] < losses[0] - 0.5, losses
    assert re.search(r'\| End of training \| test loss +\d+\.\d+ \| test ppl', proc.stdout), proc.stdout
    ckpt = checkpoint.load(str(tmp_path / 'model.pt'))
    assert ckpt['model_args'] == dict(rnn_type='Transformer', ntoken=24, ninp=16, nhid=32, nlayers=2, dropout=0.0,
                                      tie_weights=False, nhead=2)
    fp16_model = recipe.startswith('fp16')
    for name, weight in ckpt['model'].items():  # the classic fp16 recipes keep the LayerNorms fp32
        assert weight.dtype == (torch.float16 if fp16_model and '.norm' not in name else torch.float32), name
    proc = call_script('generate.py', '--checkpoint', 'model.pt', '--outf', 'out.txt', '--words', 40, '--context', 8,
                       cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    words = (tmp_path / 'out.txt').read_text().split()
    idx2word, padding = ckpt['vocab']['idx2word'], ckpt['vocab']['padding']
    assert len(words) == 40 and set(words) <= set(idx2word) - {idx2word[i] for i in padding}, words


FP16_RECIPES = {
    'fp16-manual': lambda model: ManualFP16Recipe(model, 1.0, 100.0, 128.0),
    'fp16-optimizer-static': lambda model: FP16OptimizerRecipe(model, 1.0, 100.0, 128.0),
    'fp16-optimizer-dynamic': lambda model: FP16OptimizerRecipe(model, 1.0, 100.0, dynamic_loss_scale=True),
}


@pytest.mark.parametrize('recipe', list(FP16_RECIPES))
def test_fp16_recipes_update_the_fp32_layer_norms_as_fp32_does(recipe):
    """The LayerNorms stay fp32 in an fp16 model: their grads are unscaled and their update is the fp32 recipe's."""
    g = torch.Generator().manual_seed(0)
    inputs, targets = torch.randint(24, (6, 3), generator=g), torch.randint(24, (18,), generator=g)
    torch.manual_seed(0)
    reference = TransformerModel(24, 16, 2, 32, 1, dropout=0.0)
    initial = reference.transformer.layers[0].norm1.weight.detach().clone()
    training.train_batch(reference, recipes.AutocastRecipe(reference, 1.0, 100.0), inputs, targets, None)
    torch.manual_seed(0)
    model = TransformerModel(24, 16, 2, 32, 1, dropout=0.0)
    _, hidden, updated = training.train_batch(model, FP16_RECIPES[recipe](model), inputs, targets, None)
    assert updated and hidden is None
    norm = model.transformer.layers[0].norm1.weight
    assert norm.dtype == torch.float32 and model.encoder.weight.dtype == torch.float16
    expected = reference.transformer.layers[0].norm1.weight.detach() - initial
    assert expected.abs().max() > 1e-3
    assert ((norm.detach() - initial) - expected).norm() / expected.norm() < 0.05


@pytest.mark.parametrize('flags, message', [
    (['--emsize', 16, '--nhead', 3], '--emsize 16 must be a multiple of --nhead 3 with --model Transformer.'),
    (['--nhead', 0], '--nhead must be at least 1 (got 0).'),
    (['--bptt', 5001], '--bptt must be at most 5000 with --model Transformer (got 5001).'),
])
def test_transformer_flags_are_checked(flags, message, corpus_dir, tmp_path, call_script):
    proc = call_script('main.py', '--data', corpus_dir, *TRANSFORMER, *flags, cwd=tmp_path)
    assert error_line(proc, 'main.py', 2) == f'main.py: error: {message}'
    assert list(tmp_path.iterdir()) == []


def test_transformer_ties_with_any_nhid(corpus_dir, tmp_path, call_script):
    """The decoder reads emsize-wide outputs, so --tied does not need --nhid equal to --emsize."""
    proc = call_script('main.py', '--data', corpus_dir, *TRANSFORMER, '--tied', '--epochs', 1, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert checkpoint.load_model(str(tmp_path / 'model.pt'))[0].decoder.weight.shape == (24, 16)


def test_resume_continues_a_transformer_run_exactly(corpus_dir, tmp_path, call_script, monkeypatch):
    """2 epochs in one go == a run stopped by SIGINT after batch 12 of epoch 1, resumed (no hidden state: None),
    stopped at the end of epoch 1, resumed for epoch 2; dropout on, so the saved RNG state matters too."""
    common = ['--data', corpus_dir, *TRANSFORMER, '--dropout', 0.2]
    (tmp_path / 'full').mkdir()
    full = call_script('main.py', *common, '--epochs', 2, cwd=tmp_path / 'full')
    assert full.returncode == 0, describe(full)

    (tmp_path / 'split').mkdir()
    train_batch, batches = training.train_batch, []

    def interrupted_after_batch_12(*args):
        result = train_batch(*args)
        batches.append(1)
        if len(batches) == 12:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(training, 'train_batch', interrupted_after_batch_12)
    first = call_script('main.py', *common, '--epochs', 2, cwd=tmp_path / 'split')
    monkeypatch.setattr(training, 'train_batch', train_batch)
    assert first.returncode == 0 and 'Exiting from training early at epoch 1, batch 12' in first.stdout, describe(first)
    saved = checkpoint.load(str(tmp_path / 'split' / 'model.pt.resume'))['resume']['progress']
    assert (saved['epoch'], saved['next_batch'], saved['hidden']) == (1, 12, None)
    second = call_script('main.py', *common, '--epochs', 1, '--resume', 'model.pt.resume', cwd=tmp_path / 'split')
    third = call_script('main.py', *common, '--epochs', 2, '--resume', 'model.pt.resume', cwd=tmp_path / 'split')
    for proc in (second, third):
        assert proc.returncode == 0, describe(proc)
    assert progress_by_epoch(first.stdout + second.stdout)[1] == progress_by_epoch(full.stdout)[1]
    assert progress_by_epoch(third.stdout)[2] == progress_by_epoch(full.stdout)[2]
    assert end_line(third.stdout) == end_line(full.stdout)
    for name in ('model.pt', 'model.pt.resume'):
        assert weights_equal(checkpoint.load(str(tmp_path / 'full' / name))['model'],
                             checkpoint.load(str(tmp_path / 'split' / name))['model']), name


def test_transformer_progress_never_holds_a_hidden_state():
    """check_progress: a Transformer run (initial hidden None) resumes mid-epoch with hidden None, never a tensor."""
    progress = {**dataclasses.asdict(session.Progress(next_batch=5)), **dataclasses.asdict(session.Line(line_start=5)),
                'elapsed': 0.0, 'metrics_bytes': 0}
    checkpoint.check_progress(progress, nbatches=38, initial_hidden=None)
    progress['hidden'] = torch.zeros(2, 8, 16)
    with pytest.raises(ValueError, match='its progress field hidden is a torch.float32 tensor'):
        checkpoint.check_progress(progress, nbatches=38, initial_hidden=None)


def test_rnn_run_saved_before_nhead_existed_still_resumes(corpus_dir, tmp_path, call_script):
    """--nhead is compared on resume only for the Transformer: an LSTM's SAVE.resume without it continues."""
    common = ['--data', corpus_dir, '--emsize', 16, '--nhid', 16, '--batch_size', 8, '--bptt', 10, '--lr', 5]
    assert call_script('main.py', *common, '--epochs', 1, cwd=tmp_path).returncode == 0
    ckpt = checkpoint.load(str(tmp_path / 'model.pt.resume'))
    del ckpt['args']['nhead']
    checkpoint.save(ckpt, str(tmp_path / 'model.pt.resume'))
    proc = call_script('main.py', *common, '--epochs', 2, '--nhead', 4, '--resume', 'model.pt.resume', cwd=tmp_path)
    assert proc.returncode == 0 and '| resuming model.pt.resume at epoch 2, batch 0' in proc.stdout, describe(proc)


@pytest.mark.parametrize('context', [0, 5001])
def test_generate_refuses_a_context_the_transformer_cannot_read(context, tmp_path, call_script):
    (tmp_path / 'model.pt').write_bytes(b'')  # the flags are checked before the checkpoint is read
    proc = call_script('generate.py', '--checkpoint', 'model.pt', '--context', context, cwd=tmp_path)
    line = error_line(proc, 'generate.py', 2)
    assert line == f'generate.py: error: --context must be between 1 and 5000 (got {context}).'
