"""data.py: Dictionary, Corpus (tokens, padding, unusable splits), batchify, get_batch."""

import pytest
import torch

import data
from conftest import write_corpus
from plumbing import errors


def words_of(corpus, ids):
    return [corpus.dictionary.idx2word[i] for i in ids.tolist()]


# ---------------------------------------------------------------- tokenization

def test_tokenization_whitespace_empty_lines_crlf_and_missing_final_newline(tmp_path):
    train = 'the  cat\tsat \n\n   on the mat   \r\nthe end'   # extra spaces, tab, empty line, CRLF, no final \n
    valid = 'a cat\r\n\r\nsat'
    test = '\n'
    write_corpus(tmp_path, train, valid, test)
    c = data.Corpus(str(tmp_path))
    assert words_of(c, c.train) == ['the', 'cat', 'sat', '<eos>', '<eos>', 'on', 'the', 'mat', '<eos>',
                                    'the', 'end', '<eos>']
    assert words_of(c, c.valid) == ['a', 'cat', '<eos>', '<eos>', 'sat', '<eos>']
    assert words_of(c, c.test) == ['<eos>']
    assert c.train.dtype == torch.int64 and c.train.dim() == 1


def test_dictionary_order_of_first_appearance_train_valid_test(tmp_path):
    write_corpus(tmp_path, 'b a b\nc\n', 'd a e\n', 'e f b\n')
    c = data.Corpus(str(tmp_path))
    assert c.dictionary.idx2word == ['b', 'a', '<eos>', 'c', 'd', 'e', 'f']
    assert c.dictionary.word2idx == {w: i for i, w in enumerate(c.dictionary.idx2word)}
    assert c.dictionary.padding == []
    assert len(c.train) == 6 and len(c.valid) == 4 and len(c.test) == 4
    # counts: every occurrence maps to the same id
    assert c.train.tolist() == [0, 1, 0, 2, 3, 2]
    assert c.valid.tolist() == [4, 1, 5, 2]
    assert c.test.tolist() == [5, 6, 0, 2]


def test_padding_to_multiple_of_8(tmp_path):
    write_corpus(tmp_path, 'a b c\n', 'd\n', 'e a\n')  # 6 words with <eos>
    c = data.Corpus(str(tmp_path), pad_to_multiple_of=8)
    d = c.dictionary
    assert len(d) % 8 == 0 and len(d) == 8
    assert d.padding == [6, 7]  # the padding words come after the real ones
    assert d.idx2word[:6] == ['a', 'b', 'c', '<eos>', 'd', 'e']
    assert all(d.word2idx[d.idx2word[i]] == i for i in range(len(d)))
    # no token of the corpus is a padding word
    used = set(torch.cat([c.train, c.valid, c.test]).tolist())
    assert used.isdisjoint(d.padding)


def test_padding_does_not_collide_with_real_pad_words(tmp_path):
    write_corpus(tmp_path, '<pad0> <pad1> x\n', '_<pad0> y\n', 'z\n')  # 7 words with <eos>
    c = data.Corpus(str(tmp_path), pad_to_multiple_of=8)
    d = c.dictionary
    assert len(d) == 8
    assert len(set(d.idx2word)) == len(d.idx2word)
    assert d.word2idx['<pad0>'] not in d.padding
    assert d.word2idx['<pad1>'] not in d.padding
    assert d.word2idx['_<pad0>'] not in d.padding
    assert len(d.padding) == 1 and d.padding[0] == 7


@pytest.mark.parametrize('multiple', [1, 3])
def test_pad_to_multiple_of_small(tmp_path, multiple):
    write_corpus(tmp_path, 'a b c d\n', 'e\n', 'f g\n')  # 8 words with <eos>
    c = data.Corpus(str(tmp_path), pad_to_multiple_of=multiple)
    expected = 8 if multiple == 1 else 9
    assert len(c.dictionary) == expected
    assert len(c.dictionary.padding) == expected - 8


def test_default_corpus_is_not_padded(tmp_path):
    write_corpus(tmp_path, 'a b c d e\n', 'e\n', 'f g\n')
    c = data.Corpus(str(tmp_path))
    assert len(c.dictionary) == 8 and c.dictionary.padding == []


# ---------------------------------------------------------------- batchify / get_batch

def test_batchify_columns_are_contiguous_chunks():
    stream = torch.arange(26)
    b = data.batchify(stream, 4)
    assert b.shape == (26 // 4, 4)
    assert b.is_contiguous()
    for j in range(4):
        assert b[:, j].tolist() == list(range(j * 6, (j + 1) * 6))


def test_batchify_exact_and_single_column():
    stream = torch.arange(24)
    assert data.batchify(stream, 4).shape == (6, 4)
    assert data.batchify(stream, 1)[:, 0].tolist() == list(range(24))


def test_get_batch_target_is_input_shifted_by_one_row():
    source = data.batchify(torch.arange(40), 4)  # [10, 4]
    bptt = 4
    starts = list(range(0, source.size(0) - 1, bptt))
    assert starts == [0, 4, 8]
    lengths = []
    for i in starts:
        inp, target = data.get_batch(source, i, bptt)
        assert inp.shape[1] == 4
        assert target.dim() == 1 and target.numel() == inp.numel()
        assert torch.equal(inp, source[i:i + len(inp)])
        assert torch.equal(target, source[i + 1:i + 1 + len(inp)].reshape(-1))
        lengths.append(len(inp))
    assert lengths == [4, 4, 1]  # the last chunk is shorter
    # the first target row is the second input row
    inp, target = data.get_batch(source, 0, bptt)
    assert torch.equal(target.view(-1, 4)[:-1], inp[1:])


# ---------------------------------------------------------------- errors

def test_missing_directory(tmp_path):
    missing = tmp_path / 'nope'
    with pytest.raises(errors.DataError, match='nope') as e:
        data.Corpus(str(missing))
    assert str(missing) in str(e.value)


@pytest.mark.parametrize('split', ['train', 'valid', 'test'])
def test_missing_split(tmp_path, split):
    write_corpus(tmp_path, 'a\n', 'b\n', 'c\n')
    (tmp_path / f'{split}.txt').unlink()
    with pytest.raises(errors.DataError) as e:
        data.Corpus(str(tmp_path))
    assert str(tmp_path / f'{split}.txt') in str(e.value)


@pytest.mark.parametrize('split', ['train', 'valid', 'test'])
def test_empty_split_has_no_tokens(tmp_path, split):
    contents = {'train': 'a\n', 'valid': 'b\n', 'test': 'c\n', split: ''}
    write_corpus(tmp_path, contents['train'], contents['valid'], contents['test'])
    with pytest.raises(errors.DataError, match='no tokens') as e:
        data.Corpus(str(tmp_path))
    assert str(tmp_path / f'{split}.txt') in str(e.value)


def test_blank_lines_only_are_eos_tokens(tmp_path):
    write_corpus(tmp_path, 'a b\n', '\n\n   \n', 'c\n')
    c = data.Corpus(str(tmp_path))
    assert words_of(c, c.valid) == ['<eos>'] * 3


def test_non_utf8_file(tmp_path):
    write_corpus(tmp_path, 'a b\n', b'good words\nbad \xff\xfe byte\n', 'c\n')
    with pytest.raises(errors.DataError, match='UTF-8') as e:
        data.Corpus(str(tmp_path))
    assert str(tmp_path / 'valid.txt') in str(e.value)


def test_nul_bytes(tmp_path):
    write_corpus(tmp_path, 'a b\n', 'c\n', b'x y\n\x00\x00\x00binary\n')
    with pytest.raises(errors.DataError, match='NUL') as e:
        data.Corpus(str(tmp_path))
    assert str(tmp_path / 'test.txt') in str(e.value)
