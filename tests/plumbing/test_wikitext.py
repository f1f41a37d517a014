"""plumbing/wikitext.py: the streamed reader (chunk boundaries, bad bytes, bounded memory) and the download."""
import hashlib
import os
import random
import tracemalloc
from pathlib import Path

import pytest

import data
from conftest import REPO, file_mode, temp_files, umask, write_corpus
from plumbing import errors, wikitext


def reference_tokens(paths):
    """The original example's tokenizer: a plain loop, line.split() + ['<eos>'], Dictionary.add_word."""
    dictionary = data.Dictionary()
    streams = []
    for path in paths:
        ids = []
        with open(path, encoding='utf-8') as f:
            for line in f:
                for word in line.split() + ['<eos>']:
                    ids.append(dictionary.add_word(word))
        streams.append(ids)
    return dictionary, streams


def words_of(corpus, ids):
    return [corpus.dictionary.idx2word[i] for i in ids.tolist()]


# ---------------------------------------------------------------- reading in bounded chunks

def assert_tokens_match_reference(directory):
    c = data.Corpus(str(directory))
    ref_dict, ref_streams = reference_tokens([directory / f'{s}.txt' for s in wikitext.SPLITS])
    assert c.dictionary.idx2word == ref_dict.idx2word
    assert [c.train.tolist(), c.valid.tolist(), c.test.tolist()] == ref_streams


def straddling(pieces, size):
    """UTF-8 bytes of (text, cut) pieces, each after enough spaces that a multiple of size falls at byte cut of it."""
    out = bytearray()
    for text, cut in pieces:
        out += b' ' * (-(len(out) + cut) % size)
        out += text.encode()
    return bytes(out)


@pytest.mark.parametrize('size', [1, 2, 3, 7])
def test_chunk_boundaries_inside_words_characters_and_crlf_do_not_change_tokens(tmp_path, monkeypatch, size):
    monkeypatch.setattr(wikitext, 'READ_CHUNK_BYTES', size)
    train = straddling([
        ('split word\n', 3),            # inside a word
        ('zwei é 中 😀\n', 6),          # inside a 2-byte character ('zwei ' is 5 bytes) ...
        ('中文 end\n', 1),              # ... a 3-byte one
        ('x😀y\n', 3),                  # ... and a 4-byte one
        ('crlf\r\nnext', 5),            # between '\r' and '\n'
        ('lone\rcr\n', 5),              # after a lone '\r'
        ('a\u3000b\x85c\u2028d\x0ce\n', 2),  # inside whitespace that is not a line end
        ('x' * 40 + ' y z' * 20 + '\n', 11),  # a line, and a word, longer than the chunk
        ('\n\r\n\r\r', 1),              # empty lines
        ('last line, no newline', 4),
    ], size)
    write_corpus(tmp_path, train, b'ends with cr\r', b'ends inside a character \xe4\xb8\xad')
    assert_tokens_match_reference(tmp_path)


def test_random_texts_tokenize_the_same_for_any_chunk_size(tmp_path, monkeypatch):
    rng = random.Random(13)
    pieces = ['a', 'bc', 'word', '<eos>', ' ', '  ', '\t', '\n', '\r', '\r\n', '\x0b', '\x1c', '\x85',
              '\u2028', '\u3000', '\xa0', 'é', '中', '😀']
    for _ in range(60):
        write_corpus(tmp_path, *(''.join(rng.choices(pieces, k=rng.randint(0, 40))) + 'w' for _ in range(3)))
        for size in (1, 2, 3, 5, 7):
            monkeypatch.setattr(wikitext, 'READ_CHUNK_BYTES', size)
            assert_tokens_match_reference(tmp_path)


@pytest.mark.parametrize('size', [7, 4096])
@pytest.mark.parametrize('bad, at', [
    (b'\xff w\n', 0),
    (b'\xe4\xb8 w\n', 0),        # a character cut short: the offset is its first byte's
    (b'ok\xed\xa0\x80\n', 2),    # an encoded surrogate
    (b'end \xf0\x9f\x98', 4),    # the file ends inside a character
])
def test_bad_utf8_byte_offset_far_beyond_the_first_chunk(tmp_path, monkeypatch, size, bad, at):
    monkeypatch.setattr(wikitext, 'READ_CHUNK_BYTES', size)
    good = 'w1 é 中 😀\r\n'.encode() * 1000
    write_corpus(tmp_path, 'a\n', 'b\n', good + bad)
    with pytest.raises(errors.DataError) as e:
        data.Corpus(str(tmp_path))
    assert str(e.value) == f'{tmp_path / "test.txt"} is not UTF-8 text (bad byte at offset {len(good) + at}).'


@pytest.mark.parametrize('tail, error', [
    (b'x \x00 y \xff', 'NUL'),
    (b'x \xff y \x00', 'offset 20002'),
    (b'x \xe4\x00', 'offset 20002'),  # the NUL cuts a character short: that comes first
])
@pytest.mark.parametrize('size', [1, 7, 4096])
def test_the_first_of_a_nul_and_a_bad_byte_is_reported(tmp_path, monkeypatch, size, tail, error):
    monkeypatch.setattr(wikitext, 'READ_CHUNK_BYTES', size)
    write_corpus(tmp_path, b'word ' * 4000 + tail, 'b\n', 'c\n')
    with pytest.raises(errors.DataError, match=error):
        data.Corpus(str(tmp_path))


@pytest.mark.parametrize('content', ['one-line', 'nul'])
def test_reading_holds_one_chunk_not_the_whole_line(tmp_path, monkeypatch, content):
    """4 MiB without a newline, read 64 KiB at a time: the peak is a small part of the file."""
    monkeypatch.setattr(wikitext, 'READ_CHUNK_BYTES', 1 << 16)
    size = 4 << 20
    if content == 'one-line':  # long words, so that the ids (8 bytes each) stay small too
        words = [f'{i:04d}' * 250 + ' ' for i in range(50)]
        blob = ''.join(words[i % 50] for i in range(size // 1001)).encode()
    else:
        blob = bytes(size)
    write_corpus(tmp_path, blob, 'b\n', 'c\n')
    tracemalloc.start()
    try:
        if content == 'nul':
            with pytest.raises(errors.DataError, match='NUL'):
                data.Corpus(str(tmp_path))
        else:
            c = data.Corpus(str(tmp_path))
            assert len(c.train) == size // 1001 + 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < size // 4, peak  # reading the line whole peaks at 2 to 4 times the file


# ---------------------------------------------------------------- download_wikitext2

def _source_dir(tmp_path):
    src = tmp_path / 'src'
    write_corpus(src, 'train words here\n', 'valid words\n', 'test words\n')
    return src, src.as_uri() + '/{split}.txt'


def test_download_sha_mismatch_writes_nothing(tmp_path):
    src, url = _source_dir(tmp_path)
    dest = tmp_path / 'dest'
    with pytest.raises(errors.DataError, match='SHA-256'):
        wikitext.download_wikitext2(str(dest), url=url)
    assert not dest.exists() or list(dest.iterdir()) == []


def test_download_writes_all_three_files(tmp_path, monkeypatch):
    src, url = _source_dir(tmp_path)
    shas = {s: hashlib.sha256((src / f'{s}.txt').read_bytes()).hexdigest() for s in wikitext.SPLITS}
    monkeypatch.setattr(wikitext, 'WIKITEXT2_SHA256', shas)
    dest = tmp_path / 'dest' / 'wikitext-2'
    wikitext.download_wikitext2(str(dest), url=url)
    assert sorted(p.name for p in dest.iterdir()) == ['test.txt', 'train.txt', 'valid.txt']
    for s in wikitext.SPLITS:
        assert (dest / f'{s}.txt').read_bytes() == (src / f'{s}.txt').read_bytes()
    c = data.Corpus(str(dest))
    assert words_of(c, c.train) == ['train', 'words', 'here', '<eos>']


@pytest.mark.parametrize('mask, mode', [(0o022, 0o644), (0o077, 0o600)])
def test_download_writes_files_with_the_umasks_mode(mask, mode, tmp_path, monkeypatch):
    """Downloaded splits are ordinary files (0o666 & ~umask), written atomically: no temporary file left."""
    src, url = _source_dir(tmp_path)
    shas = {s: hashlib.sha256((src / f'{s}.txt').read_bytes()).hexdigest() for s in wikitext.SPLITS}
    monkeypatch.setattr(wikitext, 'WIKITEXT2_SHA256', shas)
    dest = tmp_path / 'dest'
    with umask(mask):
        wikitext.download_wikitext2(str(dest), url=url)
    assert sorted(p.name for p in dest.iterdir()) == ['test.txt', 'train.txt', 'valid.txt']
    assert {s: file_mode(dest / f'{s}.txt') for s in wikitext.SPLITS} == {s: mode for s in wikitext.SPLITS}
    assert not temp_files(dest)


def test_download_skips_files_already_present(tmp_path, monkeypatch):
    src, url = _source_dir(tmp_path)
    shas = {s: hashlib.sha256((src / f'{s}.txt').read_bytes()).hexdigest() for s in wikitext.SPLITS}
    monkeypatch.setattr(wikitext, 'WIKITEXT2_SHA256', shas)
    dest = tmp_path / 'dest'
    dest.mkdir()
    (dest / 'train.txt').write_text('my own train\n')
    wikitext.download_wikitext2(str(dest), url=url)
    assert (dest / 'train.txt').read_text() == 'my own train\n'
    assert (dest / 'valid.txt').read_bytes() == (src / 'valid.txt').read_bytes()


def test_download_unreachable_url(tmp_path):
    url = (tmp_path / 'does-not-exist').as_uri() + '/{split}.txt'
    dest = tmp_path / 'dest'
    with pytest.raises(errors.DataError, match='--data'):
        wikitext.download_wikitext2(str(dest), url=url)
    assert not dest.exists() or list(dest.iterdir()) == []


# ---------------------------------------------------------------- the real WikiText-2 (if present)

def _wikitext2_dir():
    env = os.environ.get('WIKITEXT2_DIR')
    candidates = ([Path(env)] if env else []) + [REPO.parent / 'shared' / 'data' / 'wikitext-2',
                                                 REPO / 'data' / 'wikitext-2']
    for path in candidates:
        if all((path / f'{s}.txt').is_file() for s in wikitext.SPLITS):
            return path
    return None


def test_real_wikitext2(tmp_path):
    path = _wikitext2_dir()
    if path is None:
        pytest.skip('WikiText-2 not found (set WIKITEXT2_DIR or put it in ../shared/data/wikitext-2)')
    c = data.Corpus(str(path), 8)
    assert (len(c.train), len(c.valid), len(c.test)) == (2088628, 217646, 245569)
    assert len(c.dictionary) == 33280
    assert len(c.dictionary.padding) == 2
    assert c.dictionary.padding == [33278, 33279]
    # The pinned SHA-256 values are those of these files: a download from them succeeds.
    dest = tmp_path / 'wikitext-2'
    wikitext.download_wikitext2(str(dest), url=path.as_uri() + '/{split}.txt')
    for s in wikitext.SPLITS:
        assert (dest / f'{s}.txt').read_bytes() == (path / f'{s}.txt').read_bytes()


def test_tokens_match_naive_reference_on_random_corpus(tmp_path):
    """A random corpus with odd whitespace, bigger than the tokenizer's 1 MiB read chunk."""
    rng = random.Random(1234)
    vocab = [''.join(rng.choice('abcdefghijklmnopqrstuvwxyzé中') for _ in range(rng.randint(1, 8)))
             for _ in range(3000)] + ['<unk>', '@-@', '<eos>']
    seps = [' ', ' ', ' ', '  ', '\t', ' \x0c ', '\u3000', '\u2028']
    ends = ['\n', '\n', '\n', '\r\n', '\r', ' \n', '\n\n', '\t\n']

    def text(nlines):
        out = []
        for _ in range(nlines):
            n = rng.choice([0, 0, 1, 5, 12, 30])
            words = [rng.choice(vocab) for _ in range(n)]
            line = ''.join(w + rng.choice(seps) for w in words)
            out.append(rng.choice(['', ' ', '\t']) + line + rng.choice(ends))
        return ''.join(out).rstrip('\n\r')  # last line without a newline

    splits = [text(120_000), text(3000), text(3000)]
    write_corpus(tmp_path, *splits)
    assert (tmp_path / 'train.txt').stat().st_size > (1 << 20)
    c = data.Corpus(str(tmp_path))
    ref_dict, ref_streams = reference_tokens([tmp_path / f'{s}.txt' for s in ('train', 'valid', 'test')])
    assert c.dictionary.idx2word == ref_dict.idx2word
    assert c.dictionary.word2idx == ref_dict.word2idx
    assert c.train.tolist() == ref_streams[0]
    assert c.valid.tolist() == ref_streams[1]
    assert c.test.tolist() == ref_streams[2]
