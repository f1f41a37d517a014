"""Training runs as a user runs them: every script and recipe (LSTM and Transformer) trains, the files it writes."""
import math
import re

import pytest
import torch

import data
import recipes
from conftest import (ADAMW_FLAGS, ADAMW_LR, ENV, RUNS, SMALL, TINY_RUN, TRAIN_ARGS, TRANSFORMER, describe, end_line,
                      file_mode, header, progress_by_epoch, run_real, run_script, temp_files)
from plumbing import checkpoint

LOSS_RE = re.compile(r'^\| epoch +\d+ \| .*\| loss +(\d+\.\d+) \|', re.M)
TRANSFORMER_RECIPES = {  # the recipe's name: (script, flags)
    'fp32': ('main.py', []),
    'fp16-manual': ('main.py', ['--fp16']),
    'fp16-optimizer-static': ('main_fp16_optimizer.py', ['--fp16']),
    'fp16-optimizer-dynamic': ('main_fp16_optimizer.py', ['--fp16', '--dynamic-loss-scale']),
    'amp': ('main.py', ['--amp']),
    'bf16': ('main.py', ['--bf16']),
}


@pytest.mark.parametrize('script', ['main.py', 'main_fp16_optimizer.py'])
@pytest.mark.parametrize('mode, header', [('--amp', 'amp: autocast float16'), ('--bf16', 'bf16: autocast bfloat16')])
def test_autocast_modes_train(script, mode, header, corpus_dir, tmp_path):
    proc = run_script(script, '--data', corpus_dir, *TRAIN_ARGS, mode, cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, describe(proc)
    assert 'Traceback' not in proc.stdout + proc.stderr, describe(proc)
    assert f'| precision {header}' in proc.stdout
    assert 'static_loss_scale' not in proc.stdout
    losses = [float(x) for x in LOSS_RE.findall(proc.stdout)]
    assert len(losses) >= 4 and losses[-1] < losses[0], losses
    if mode == '--amp':  # the loss scale is logged with GradScaler's initial 2**16
        assert '| loss scale 65536' in proc.stdout
    else:
        assert '| loss scale' not in proc.stdout
    assert re.search(r'\| End of training \| test loss +\d+\.\d+ \| test ppl', proc.stdout)
    assert (tmp_path / 'model.pt').exists()


@pytest.mark.parametrize('name', list(ADAMW_FLAGS))
def test_training_with_adamw_lowers_the_loss(name, corpus_dir, tmp_path, call_script, monkeypatch):
    """The scripts pass --use-optimizer to the recipe: one AdamW, stepped once per update made."""
    made, original = [], recipes.make_optimizer

    def recorded_optimizer(params, lr, adamw=False):
        made.append(original(params, lr, adamw))
        return made[-1]

    monkeypatch.setattr(recipes, 'make_optimizer', recorded_optimizer)
    script, flags = ADAMW_FLAGS[name]
    proc = call_script(script, '--data', corpus_dir, *TINY_RUN, '--epochs', 1, *flags, '--use-optimizer', cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    header = r'^\| device cpu \| precision .+ \| optimizer AdamW \| vocabulary '
    assert re.search(header, proc.stdout, re.M), proc.stdout
    losses = [float(x) for x in LOSS_RE.findall(proc.stdout)]
    assert len(losses) >= 5 and losses[-1] < losses[0] - 0.3, losses
    assert all(f'| lr {ADAMW_LR:g} |' in line for line in proc.stdout.splitlines() if line.startswith('| epoch'))
    assert len(made) == 1 and type(made[0]) is torch.optim.AdamW
    nbatches = int(re.search(r'\| +\d+/ *(\d+) batches', proc.stdout).group(1))
    updates = nbatches - proc.stdout.count('| gradients are not finite')
    assert {int(s['step']) for s in made[0].state.values()} == {updates}
    assert all(p.dtype == torch.float32 for group in made[0].param_groups for p in group['params'])


@pytest.mark.parametrize('recipe', list(TRANSFORMER_RECIPES))
def test_every_recipe_trains_a_transformer_that_generates(recipe, corpus_dir, tmp_path, call_script):
    script, flags = TRANSFORMER_RECIPES[recipe]
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


def test_transformer_ties_with_any_nhid(corpus_dir, tmp_path, call_script):
    """The decoder reads emsize-wide outputs, so --tied does not need --nhid equal to --emsize."""
    proc = call_script('main.py', '--data', corpus_dir, *TRANSFORMER, '--tied', '--epochs', 1, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert checkpoint.load_model(str(tmp_path / 'model.pt'))[0].decoder.weight.shape == (24, 16)


ONE_EPOCH = ['--epochs', 1, *TRAIN_ARGS[2:]]

BATCH_LOSS_RE = re.compile(r'^\| epoch +\d+ \| +\d+/ *(\d+) batches .*\| loss +(\d+\.\d+) \|', re.M)
END_VALUES_RE = re.compile(r'\| End of training \| test loss +(\d+\.\d+) \| test ppl +(\S+)')


@pytest.mark.parametrize('name', list(RUNS))
def test_training_run(name, training_runs, corpus_dir):
    proc, cwd = training_runs(name)
    out = proc.stdout
    assert proc.returncode == 0, describe(proc)
    assert 'Traceback' not in out + proc.stderr and ': error: ' not in proc.stderr, describe(proc)
    assert 'static_loss_scale' not in out  # the warning is for --static-loss-scale without --fp16 only

    # the periodic lines: every log interval, in both epochs; the loss goes down
    logged = BATCH_LOSS_RE.findall(out)
    nbatches = int(logged[0][0])
    assert len(logged) == 2 * (nbatches // 5), out
    losses = [float(loss) for _, loss in logged]
    assert losses[-1] < losses[0], losses
    assert out.count('| end of epoch') == 2

    m = END_VALUES_RE.search(out)
    assert m, out
    test_loss, test_ppl = float(m.group(1)), float(m.group(2))
    assert math.isfinite(test_loss) and test_ppl == pytest.approx(math.exp(test_loss), rel=0.01)

    # the checkpoint: the best epoch's weights, the vocabulary of the padded corpus
    ckpt_path = cwd / 'model.pt'
    assert ckpt_path.is_file()
    ckpt = checkpoint.load(str(ckpt_path))
    corpus = data.Corpus(str(corpus_dir), pad_to_multiple_of=8)
    assert ckpt['vocab']['idx2word'] == corpus.dictionary.idx2word
    assert ckpt['vocab']['padding'] == corpus.dictionary.padding
    valid = [float(v) for v in re.findall(r'\| valid loss +(\d+\.\d+)', out)]
    assert ckpt['best_val_loss'] == pytest.approx(min(valid), abs=0.006)
    fp16 = '--fp16' in RUNS[name][1]
    weight_dtype = ckpt['model']['encoder.weight'].dtype
    assert weight_dtype == (torch.float16 if fp16 else torch.float32)
    model, idx2word, padding = checkpoint.load_model(str(ckpt_path))
    assert model.encoder.num_embeddings == len(idx2word) == len(corpus.dictionary)
    # an ordinary file's permissions under the run's umask (022), and no temporary file left by the atomic save
    assert sorted(p.name for p in cwd.iterdir()) == ['model.pt', 'model.pt.metrics.jsonl', 'model.pt.resume']
    assert file_mode(ckpt_path) == file_mode(cwd / 'model.pt.resume') == 0o644
    assert not temp_files(cwd)

    header = next(line for line in out.splitlines() if line.startswith('| device '))
    if name == 'main-fp32':
        assert 'precision fp32' in header
        assert 'loss scale' not in ''.join(line for line in out.splitlines() if BATCH_LOSS_RE.match(line))
    elif name == 'main-fp16':
        assert 'manual fp32 master weights, static loss scale 128' in header
        assert all('| loss scale 128 |' in line for line in out.splitlines() if BATCH_LOSS_RE.match(line))
    else:
        assert re.search(r"FP16_Optimizer from (apex\.fp16_utils|this example's fp16_utils)", header), header
        if name == 'fp16opt-static':
            assert 'static loss scale 128' in header
            assert 'not finite' not in out
        else:
            assert 'dynamic loss scale' in header
            # starts at apex's 2**16; each skipped update halves it (no growth: that takes 2000 clean updates)
            skips = re.findall(r'^\| gradients are not finite: update skipped \((\d+) so far, loss scale now (\S+)\)$',
                               out, re.M)
            assert [int(n) for n, _ in skips] == list(range(1, len(skips) + 1))
            assert [s for _, s in skips] == [f'{2.0 ** (15 - i):g}' for i in range(len(skips))]  # halves each time
            scales = [float(x) for x in re.findall(r'\| loss scale (\S+) \|', out)]
            assert scales and scales[0] <= 2 ** 16 and scales == sorted(scales, reverse=True)
            assert scales[-1] >= 2.0 ** (16 - len(skips))
            # each periodic line counts the updates skipped so far in its epoch
            counts = [int(n) for n in re.findall(r'^\| epoch +1 \| .*\| skipped (\d+)$', out, re.M)]
            lines = out.splitlines()
            first_periodic = next(i for i, line in enumerate(lines) if BATCH_LOSS_RE.match(line))
            skipped_before = sum(line.startswith('| gradients are not finite') for line in lines[:first_periodic])
            assert counts[0] == skipped_before and counts[-1] <= len(skips), (counts, len(skips))
    if name != 'fp16opt-dynamic':
        assert 'not finite' not in out
        assert all(line.endswith('| skipped 0') for line in out.splitlines() if BATCH_LOSS_RE.match(line))


def test_fp32_and_fp16_runs_agree_roughly(training_runs):
    """fp16 with fp32 masters tracks fp32 training: the test losses are close."""
    results = {}
    for name in ('main-fp32', 'main-fp16', 'fp16opt-static'):
        proc, _ = training_runs(name)
        assert proc.returncode == 0
        results[name] = float(END_VALUES_RE.search(proc.stdout).group(1))
    assert abs(results['main-fp16'] - results['main-fp32']) < 0.1, results
    assert abs(results['fp16opt-static'] - results['main-fp32']) < 0.1, results


def test_static_loss_scale_without_fp16_warns_and_trains_fp32(tmp_path, call_script, corpus_dir):
    proc = call_script('main_fp16_optimizer.py', '--data', corpus_dir, *ONE_EPOCH, '--static-loss-scale', 64, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    lines = proc.stdout.splitlines()
    warning = next(i for i, line in enumerate(lines) if 'static_loss_scale != 1.0 is only necessary with --fp16' in line)
    header = next(i for i, line in enumerate(lines) if line.startswith('| device '))
    assert warning < header and '| precision fp32 |' in lines[header], proc.stdout
    assert 'loss scale' not in ''.join(line for line in lines if BATCH_LOSS_RE.match(line))
    assert END_VALUES_RE.search(proc.stdout)


def test_fp16_static_loss_scale_flag_is_used(tmp_path, call_script, corpus_dir):
    proc = call_script('main.py', '--data', corpus_dir, *ONE_EPOCH, '--fp16', '--static-loss-scale', 64, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert 'static_loss_scale' not in proc.stdout
    assert '| precision fp16, manual fp32 master weights, static loss scale 64 |' in proc.stdout
    periodic = [line for line in proc.stdout.splitlines() if BATCH_LOSS_RE.match(line)]
    assert periodic and all('| loss scale 64 |' in line for line in periodic)


# ---------------------------------------------------------------- files written follow the umask

def test_written_files_follow_a_strict_umask(tmp_path, corpus_dir):
    """Under umask 077 the files the scripts write are the user's alone (0600), as open() would make them;
    test_training_run and test_generate_words check 0644 under umask 022."""
    proc = run_script('main.py', '--data', corpus_dir, *ONE_EPOCH, cwd=tmp_path, env=ENV, umask=0o077)
    assert proc.returncode == 0, describe(proc)
    proc = run_script('generate.py', '--words', 30, cwd=tmp_path, env=ENV, umask=0o077)  # model.pt -> generated.txt
    assert proc.returncode == 0, describe(proc)
    assert len((tmp_path / 'generated.txt').read_text().split()) == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ['generated.txt', 'model.pt', 'model.pt.metrics.jsonl', 'model.pt.resume']
    assert {name: file_mode(tmp_path / name) for name in ('generated.txt', 'model.pt', 'model.pt.resume')} == \
        {'generated.txt': 0o600, 'model.pt': 0o600, 'model.pt.resume': 0o600}


# ---------------------------------------------------------------- reproducibility

def test_same_seed_same_losses(tmp_path, call_script, corpus_dir, resume_runs):
    """Two runs with the same seed and flags print the same losses; another seed prints others."""
    reference = resume_runs('main-fp32').full
    assert reference.returncode == 0, describe(reference)
    again = run_script('main.py', '--data', corpus_dir, *SMALL, '--epochs', 2, cwd=tmp_path, env=ENV)
    assert again.returncode == 0, describe(again)
    ref_lines = progress_by_epoch(reference.stdout)
    assert sum(len(lines) for lines in ref_lines.values()) >= 16, ref_lines
    assert progress_by_epoch(again.stdout) == ref_lines
    assert end_line(again.stdout) == end_line(reference.stdout)

    (tmp_path / 'seed2').mkdir()
    other = call_script('main.py', '--data', corpus_dir, *SMALL, '--epochs', 2, '--seed', 2, cwd=tmp_path / 'seed2')
    assert other.returncode == 0, describe(other)
    assert progress_by_epoch(other.stdout) != ref_lines


def assert_trained(proc, cwd):
    """A clean training run of main.py with SMALL and --epochs 1."""
    assert proc.returncode == 0, describe(proc)
    assert 'Traceback' not in proc.stdout + proc.stderr and ': error: ' not in proc.stderr, describe(proc)
    assert header(proc.stdout).startswith('| device cpu | precision fp32 |')
    assert sorted(progress_by_epoch(proc.stdout)) == [1]
    end_line(proc.stdout)
    assert sorted(p.name for p in cwd.iterdir()) == ['model.pt', 'model.pt.metrics.jsonl', 'model.pt.resume']
    checkpoint.load_model(str(cwd / 'model.pt'))
    assert checkpoint.load(str(cwd / 'model.pt.resume'))['resume']['progress']['epoch'] == 2


@pytest.mark.parametrize('noisy', [False, True])
def test_real_training_run_with_startup_noise(noisy, tmp_path, corpus_dir, noisy_env):
    proc = run_real('main.py', ['--data', corpus_dir, *SMALL, '--epochs', 1], tmp_path, noisy_env, noisy)
    assert_trained(proc, tmp_path)
