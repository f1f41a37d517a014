"""WikiText-2 on disk: the download and its checksums, and the streamed reader that turns a
split into token ids with bounded memory and exact errors (bad UTF-8, NUL bytes, unreadable files)."""
import array
import codecs
import hashlib
import itertools
import os
import urllib.request
from collections import defaultdict

import torch

from plumbing.errors import DataError
from plumbing.files import atomic_write

SPLITS = ('train', 'valid', 'test')
EOS = '<eos>'
READ_CHUNK_BYTES = 1 << 20  # bounds the memory of reading, however long a line

# The files pytorch/examples serves for word_language_model, and their SHA-256.
WIKITEXT2_URL = 'https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2/{split}.txt'
WIKITEXT2_SHA256 = {
    'train': '9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f',
    'valid': 'f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8',
    'test': 'd790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0',
}
DEFAULT_DATA = os.path.join('.', 'data', 'wikitext-2')


def split_files(path):
    """{'train': PATH/train.txt, ...}, each checked to be a file."""
    files = {split: os.path.join(path, f'{split}.txt') for split in SPLITS}
    if not os.path.isdir(path):
        raise DataError(f'data directory {path} does not exist.')
    for file in files.values():
        if os.path.isdir(file):
            raise DataError(f'{file} is a directory, not a text file.')
        if os.path.exists(file) and not os.path.isfile(file):
            raise DataError(f'{file} is not a regular file (a FIFO, device or socket); give a directory of text files.')
        if not os.path.isfile(file):
            raise DataError(f'{file} is missing (the data directory needs train.txt, valid.txt and test.txt).')
    return files


def token_ids(path, dictionary):
    """Token ids of a text file, as a tensor: each line is line.split() + ['<eos>'],
    and a word new to dictionary (data.Dictionary) gets the next id.

    The file is read READ_CHUNK_BYTES at a time, so memory does not grow with
    the length of a line. A word cut by a chunk's end is held back until the
    next chunk shows whether it goes on.

    Ids are collected in an int64 array (8 bytes a token), which becomes the tensor without a copy.
    """
    # The missing-key factory is the dict's own length: a new word gets the next id without a Python call per word.
    word2idx = defaultdict(None, dictionary.word2idx)
    word2idx.default_factory = word2idx.__len__
    ids = array.array('q')
    # Pieces of the word the text so far ends in: kept apart so that a huge word is joined once.
    unfinished = []
    last_char = '\n'  # of the text so far: an empty file has no line
    try:
        for text in text_chunks(path, READ_CHUNK_BYTES):
            if not text:
                continue
            words = text.replace('\n', f' {EOS} ').split()
            first = 0  # index of the first word that starts in this text
            if not text[0].isspace():
                unfinished.append(words[0])
                first = 1
            # The unfinished word ends here, unless this text is all one piece of it.
            if unfinished and (len(words) > first or text[-1].isspace()):
                ids.append(word2idx[''.join(unfinished)])
                unfinished = []
            if len(words) > first and not text[-1].isspace():
                unfinished.append(words.pop())
            ids.extend(map(word2idx.__getitem__, itertools.islice(words, first, None)))
            last_char = text[-1]
    except OSError as e:
        raise DataError(f'cannot read {path}: {e.strerror}.') from None
    if unfinished:
        ids.append(word2idx[''.join(unfinished)])
    if last_char != '\n':  # the last line has no newline: it still ends with <eos>
        ids.append(word2idx[EOS])
    if len(ids) == 0:
        raise DataError(f'{path} has no tokens.')
    dictionary.word2idx = dict(word2idx)
    dictionary.idx2word.extend(list(word2idx)[len(dictionary.idx2word):])
    return torch.frombuffer(ids, dtype=torch.int64)


def text_chunks(path, size):
    """The text of a UTF-8 file in pieces, reading `size` bytes at a time, newlines as in text mode.

    As open(path, encoding='utf-8', newline=None) would: '\\r\\n' and a lone '\\r' become
    '\\n'. A '\\r' at a piece's end waits for the next piece, which may start with its '\\n';
    so does a character whose bytes are cut by the read. The first NUL byte or byte that
    is not UTF-8 raises DataError as soon as its chunk is read, giving a bad byte's offset.
    """
    decoder = codecs.getincrementaldecoder('utf-8')()
    at_start = True  # a byte-order mark there (which some editors write) is not text
    offset = 0  # in the file, of the next byte read
    held_cr = ''
    with open(path, 'rb') as f:
        while True:
            raw = f.read(size)
            nul = raw.find(b'\x00')
            held_bytes = len(decoder.getstate()[0])  # a character's first bytes, from the chunk before
            try:  # whichever comes first, a bad byte or a NUL, is the one reported
                text = decoder.decode(raw if nul < 0 else raw[:nul], final=nul >= 0 or not raw)
            except UnicodeDecodeError as e:  # e.start counts from the held bytes
                raise DataError(f'{path} is not UTF-8 text (bad byte at offset {offset - held_bytes + e.start}).') from None
            if nul >= 0:
                raise DataError(f'{path} is not a text file (it contains NUL bytes).')
            offset += len(raw)
            if at_start and text:
                text, at_start = text.removeprefix('\ufeff'), False
            if held_cr:
                text = held_cr + text
                held_cr = ''
            if raw and text.endswith('\r'):
                text, held_cr = text[:-1], '\r'
            if '\r' in text:
                text = text.replace('\r\n', '\n').replace('\r', '\n')
            yield text
            if not raw:
                return


def download_wikitext2(path, url=WIKITEXT2_URL):
    """Fetch and verify any WikiText-2 split missing from path. Each file is written atomically."""
    missing = [s for s in SPLITS if not os.path.exists(os.path.join(path, f'{s}.txt'))]
    if not missing:
        return
    for split in missing:
        dest = os.path.join(path, f'{split}.txt')
        source = url.format(split=split)
        print(f'| downloading {source}', flush=True)
        try:
            with urllib.request.urlopen(source, timeout=60) as response:
                payload = response.read()
        except OSError as e:
            raise DataError(
                f'could not download WikiText-2 ({e}); download train.txt, valid.txt and test.txt from '
                f'{url.format(split="{train,valid,test}")} into {path}, or pass --data DIR.') from None
        digest = hashlib.sha256(payload).hexdigest()
        if digest != WIKITEXT2_SHA256[split]:
            raise DataError(f'downloaded {source} has SHA-256 {digest}, expected {WIKITEXT2_SHA256[split]}; nothing was written.')
        os.makedirs(path, exist_ok=True)
        with atomic_write(dest) as f:
            f.write(payload)
