"""generate.py: words from a checkpoint, --prompt, temperature, and checkpoints it cannot use."""
import pytest
import torch

import generate as generate_script
from conftest import ENV, assert_clean_error, describe, error_line, file_mode, run_script, temp_files, write_corpus
from plumbing import checkpoint, errors


@pytest.mark.parametrize('context', [0, 5001])
def test_generate_refuses_a_context_the_transformer_cannot_read(context, tmp_path, call_script):
    (tmp_path / 'model.pt').write_bytes(b'')  # the flags are checked before the checkpoint is read
    proc = call_script('generate.py', '--checkpoint', 'model.pt', '--context', context, cwd=tmp_path)
    line = error_line(proc, 'generate.py', 2)
    assert line == f'generate.py: error: --context must be between 1 and 5000 (got {context}).'


# ---------------------------------------------------------------- generate.py

@pytest.fixture(scope='module')
def fp16_checkpoint(training_runs):
    proc, cwd = training_runs('main-fp16')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return cwd / 'model.pt'


def test_generate_words(tmp_path, fp16_checkpoint):
    proc = run_script('generate.py', '--checkpoint', fp16_checkpoint, '--words', 57, '--outf', 'out.txt',
                      cwd=tmp_path, env=ENV, umask=0o022)
    assert proc.returncode == 0, describe(proc)
    assert 'Traceback' not in proc.stdout + proc.stderr, describe(proc)
    text = (tmp_path / 'out.txt').read_text(encoding='utf-8')
    lines = text.splitlines()
    assert [len(line.split()) for line in lines] == [20, 20, 17]
    vocab = checkpoint.load(str(fp16_checkpoint))['vocab']
    padding_words = {vocab['idx2word'][i] for i in vocab['padding']}
    assert padding_words  # the tiny vocabulary was padded: the check below means something
    words = text.split()
    assert len(words) == 57
    assert set(words) <= set(vocab['idx2word'])
    assert not set(words) & padding_words
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out.txt']  # no temporary file left
    assert file_mode(tmp_path / 'out.txt') == 0o644


def test_generate_never_samples_padding(tmp_path, fp16_checkpoint):
    # At a high temperature the distribution is nearly uniform: unmasked padding would show up.
    proc = run_script('generate.py', '--checkpoint', fp16_checkpoint, '--words', 600, '--temperature', 100,
                      '--outf', 'hot.txt', cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, describe(proc)
    vocab = checkpoint.load(str(fp16_checkpoint))['vocab']
    padding_words = {vocab['idx2word'][i] for i in vocab['padding']}
    words = (tmp_path / 'hot.txt').read_text(encoding='utf-8').split()
    assert len(words) == 600
    assert not set(words) & padding_words
    real = set(vocab['idx2word']) - padding_words
    assert len(set(words)) > len(real) // 2  # high temperature: many different words


def test_generate_temperature_zero(tmp_path, call_script, fp16_checkpoint):
    proc = call_script('generate.py', '--checkpoint', fp16_checkpoint, '--temperature', 0, '--outf', 'out.txt',
                       cwd=tmp_path)
    assert_clean_error(proc, 'generate.py', 2, '--temperature', '(got 0)')
    assert not (tmp_path / 'out.txt').exists()


def test_generate_missing_checkpoint(tmp_path, call_script):
    proc = call_script('generate.py', '--checkpoint', 'no-such-model.pt', '--outf', 'out.txt', cwd=tmp_path)
    assert_clean_error(proc, 'generate.py', 2, '--checkpoint no-such-model.pt: no such file.')
    assert not (tmp_path / 'out.txt').exists()


@pytest.mark.parametrize('kind', ['text', 'binary-junk', 'truncated', 'pickled-module', 'foreign-dict'])
def test_generate_unusable_checkpoint(tmp_path, call_script, fp16_checkpoint, kind):
    bad = tmp_path / 'bad.pt'
    if kind == 'text':
        bad.write_bytes(b'hello world\n')  # e.g. a text file passed by mistake
    elif kind == 'binary-junk':
        bad.write_bytes(b'this is not a checkpoint\x00' * 10)
    elif kind == 'truncated':
        good = fp16_checkpoint.read_bytes()
        bad.write_bytes(good[:len(good) // 2])
    elif kind == 'pickled-module':
        torch.save(torch.nn.Linear(2, 2), bad)  # what the original example saved: refused under weights_only
    else:
        torch.save({'model': {}}, bad)
    proc = call_script('generate.py', '--checkpoint', 'bad.pt', '--outf', 'out.txt', cwd=tmp_path)
    assert_clean_error(proc, 'generate.py', 1, 'bad.pt')
    assert not (tmp_path / 'out.txt').exists()
    assert not temp_files(tmp_path)

CYCLE = [f'w{i}' for i in range(16)]


@pytest.fixture(scope='module')
def cycle_checkpoint(tmp_path_factory):
    line = ' '.join(CYCLE) + '\n'
    corpus = write_corpus(tmp_path_factory.mktemp('cycle-corpus'), line * 180, line * 20, line * 20)
    cwd = tmp_path_factory.mktemp('cycle-model')
    proc = run_script('main.py', '--data', corpus, '--epochs', 3, '--emsize', 16, '--nhid', 16, '--nlayers', 1,
                      '--batch_size', 8, '--bptt', 10, '--lr', 5, '--dropout', 0, cwd=cwd, env=ENV)
    assert proc.returncode == 0, describe(proc)
    return cwd / 'model.pt'


def generate(call_script, tmp_path, checkpoint_path, *args):
    proc = call_script('generate.py', '--checkpoint', checkpoint_path, '--outf', 'out.txt', *args, cwd=tmp_path)
    return proc, (tmp_path / 'out.txt')


@pytest.mark.parametrize('prompt, continuation', [
    ('w3 w4 w5', 'w6 w7 w8 w9'),
    ('  w14\tw15 ', '<eos> w0 w1 w2'),   # split at any whitespace, like the corpus
    ('w9 w2 w7', 'w8 w9 w10 w11'),      # the last word decides, here
])
def test_generation_continues_the_prompt(prompt, continuation, tmp_path, call_script, cycle_checkpoint):
    proc, out = generate(call_script, tmp_path, cycle_checkpoint, '--prompt', prompt, '--words', 4,
                         '--temperature', 0.01)
    assert proc.returncode == 0, describe(proc)
    assert out.read_text(encoding='utf-8') == ' '.join(prompt.split()) + '\n' + continuation + ' \n'


def test_every_prompt_word_is_read_before_the_first_sample(tmp_path, call_script, cycle_checkpoint, monkeypatch):
    """The model's first input is the whole prompt; then one sampled word at a time, with the state it left."""
    calls = []
    load_model = checkpoint.load_model

    def recording_load_model(path):
        model, idx2word, padding = load_model(path)
        forward = model.forward

        def recording_forward(input, hidden):
            calls.append(([idx2word[i] for i in input.view(-1).tolist()], hidden))
            return forward(input, hidden)
        model.forward = recording_forward
        return model, idx2word, padding
    monkeypatch.setattr(checkpoint, 'load_model', recording_load_model)
    proc, out = generate(call_script, tmp_path, cycle_checkpoint, '--prompt', 'w1 w2 w3', '--words', 3)
    assert proc.returncode == 0, describe(proc)
    sampled = out.read_text(encoding='utf-8').splitlines()[1].split()
    assert [words for words, _ in calls] == [['w1', 'w2', 'w3'], sampled[:1], sampled[1:2]]
    first_hidden, second_hidden = calls[0][1], calls[1][1]
    assert not any(h.any() for h in first_hidden)  # init_hidden: zeros
    assert all(h.any() for h in second_hidden)     # the state the prompt left


@pytest.mark.parametrize('prompt, named', [
    ('w1 wx w2 wy wx', '"wx", "wy" are'),
    ('w1 <pad0>', '"<pad0>" is'),  # padding rounds the vocabulary up; the model never saw it
])
def test_an_unknown_prompt_word_is_a_usage_error_naming_it(prompt, named, tmp_path, call_script, cycle_checkpoint):
    proc, out = generate(call_script, tmp_path, cycle_checkpoint, '--prompt', prompt)
    line = error_line(proc, 'generate.py', 2)
    assert line == f'generate.py: error: --prompt: {named} not in the vocabulary of {cycle_checkpoint}.'
    assert not out.exists()


def test_the_unknown_word_error_points_at_unk_when_the_model_has_it():
    with pytest.raises(errors.UsageError) as error:
        generate_script.prompt_ids(['a', 'b'], ['<unk>', 'a', '<pad0>'], {2}, 'model.pt')
    assert str(error.value) == ('--prompt: "b" is not in the vocabulary of model.pt; '
                                '<unk> stands for the words it does not know.')
    assert generate_script.prompt_ids(['a', '<unk>', 'a'], ['<unk>', 'a', '<pad0>'], {2}, 'model.pt') == [1, 0, 1]


@pytest.mark.parametrize('prompt', ['', ' \t '])
def test_an_empty_prompt_is_no_prompt(prompt, tmp_path, call_script, cycle_checkpoint):
    """No prompt line, and the same random start (the same seed) as without --prompt."""
    proc, out = generate(call_script, tmp_path, cycle_checkpoint, '--words', 25)
    assert proc.returncode == 0, describe(proc)
    without = out.read_text(encoding='utf-8')
    proc, out = generate(call_script, tmp_path, cycle_checkpoint, '--words', 25, '--prompt', prompt)
    assert proc.returncode == 0, describe(proc)
    assert out.read_text(encoding='utf-8') == without
    assert [len(line.split()) for line in without.splitlines()] == [20, 5]


def test_a_prompt_with_no_words_to_generate_writes_the_prompt(tmp_path, call_script, cycle_checkpoint):
    proc, out = generate(call_script, tmp_path, cycle_checkpoint, '--prompt', 'w1 w2', '--words', 0)
    assert proc.returncode == 0, describe(proc)
    assert out.read_text(encoding='utf-8') == 'w1 w2\n'


def test_pytorch_examples_flags_still_work(tmp_path, call_script, cycle_checkpoint):
    proc = call_script('generate.py', '--data', './data/wikitext-2', '--checkpoint', cycle_checkpoint,
                       '--outf', 'generated.txt', '--words', 30, '--seed', 7, '--temperature', 0.5,
                       '--log-interval', 10, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout.splitlines() == [f'| Generated {n}/30 words' for n in (10, 20, 30)]
    assert len((tmp_path / 'generated.txt').read_text(encoding='utf-8').split()) == 30
    # --accel is accepted too; without an accelerator it runs on the CPU, with a note
    proc = call_script('generate.py', '--checkpoint', cycle_checkpoint, '--accel', '--words', 5, cwd=tmp_path)
    assert proc.returncode == 0 and 'torch.accelerator finds no accelerator' in proc.stdout, describe(proc)
