"""WikiText-style corpus: a dictionary of words and the train/valid/test token streams."""
import array
import codecs
import hashlib
import itertools
import os
import urllib.request
from collections import defaultdict

import torch

from checkpoint import atomic_write

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


class DataError(Exception):
    """A problem with the corpus files, worded for the user."""


class Dictionary:
    def __init__(self):
        self.word2idx = {}
        self.idx2word = []
        self.padding = []  # indices of synthetic words added only to round up the size

    def add_word(self, word):
        if word not in self.word2idx:
            self.word2idx[word] = len(self.idx2word)
            self.idx2word.append(word)
        return self.word2idx[word]

    def pad_to_multiple_of(self, multiple):
        """Append synthetic words until len(self) % multiple == 0; none equals a real word."""
        n = 0
        while len(self) % multiple:
            word = f'<pad{n}>'
            while word in self.word2idx:  # the corpus uses this spelling: pick another
                word = '_' + word
            self.padding.append(self.add_word(word))
            n += 1

    def __len__(self):
        return len(self.idx2word)


class Corpus:
    def __init__(self, path, pad_to_multiple_of=1):
        self.dictionary = Dictionary()
        paths = {split: os.path.join(path, f'{split}.txt') for split in SPLITS}
        if not os.path.isdir(path):
            raise DataError(f'data directory {path} does not exist.')
        for split, file in paths.items():
            if os.path.isdir(file):
                raise DataError(f'{file} is a directory, not a text file.')
            if not os.path.isfile(file):
                raise DataError(f'{file} is missing (the data directory needs train.txt, valid.txt and test.txt).')
        self.train = self.tokenize(paths['train'])
        self.valid = self.tokenize(paths['valid'])
        self.test = self.tokenize(paths['test'])
        self.dictionary.pad_to_multiple_of(pad_to_multiple_of)

    def tokenize(self, path):
        """Token ids of a text file: each line is line.split() + ['<eos>'].

        The file is read READ_CHUNK_BYTES at a time, so memory does not grow with
        the length of a line. A word cut by a chunk's end is held back until the
        next chunk shows whether it goes on.

        Words go through a defaultdict whose missing-key factory is its own
        length, so a new word gets the next id inside C code. Ids are collected
        in an int64 array (8 bytes a token), which becomes the tensor without a copy.
        """
        word2idx = defaultdict(None, self.dictionary.word2idx)
        word2idx.default_factory = word2idx.__len__
        ids = array.array('q')
        unfinished = []  # pieces of the word the text so far ends in: kept apart so that a huge word is joined once
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
                if unfinished and (len(words) > first or text[-1].isspace()):  # the word ends here, unless this text is all one piece of it
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
        self.dictionary.word2idx = dict(word2idx)
        self.dictionary.idx2word.extend(list(word2idx)[len(self.dictionary.idx2word):])
        return torch.frombuffer(ids, dtype=torch.int64)


def text_chunks(path, size):
    """The text of a UTF-8 file in pieces, reading `size` bytes at a time, newlines as in text mode.

    As open(path, encoding='utf-8', newline=None) would: '\\r\\n' and a lone '\\r' become
    '\\n'. A '\\r' at a piece's end waits for the next piece, which may start with its '\\n';
    so does a character whose bytes are cut by the read. The first NUL byte or byte that
    is not UTF-8 raises DataError as soon as its chunk is read, giving a bad byte's offset.
    """
    decoder = codecs.getincrementaldecoder('utf-8')()
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


# batchify cuts the token stream into bsz equal pieces and stands them side by side
# as columns; leftover tokens at the end are dropped. With the stream a..x and bsz 4:
#
#   a b c d e f g h i j k l m n o p q r s t u v w x
#                         |
#                         v          shape [len // bsz, bsz]
#                   a g m s
#                   b h n t
#                   c i o u
#                   d j p v
#                   e k q w
#                   f l r x
#
# Each column is read by the model as its own sequence: the batch dimension buys
# parallel work, at the price that no column sees the words of its neighbour.
def batchify(data, bsz):
    nbatch = data.size(0) // bsz
    return data[:nbatch * bsz].view(bsz, nbatch).t().contiguous()


# get_batch takes rows i .. i+bptt-1 as the input and the same window one row lower
# as the target: each word's target is the word that follows it in its column.
# From the columns above, with i = 0 and bptt = 2:
#
#   input        target (before flattening)
#   a g m s      b h n t
#   b h n t      c i o u
#
# The target comes back flattened to [seq_len * bsz] for the loss. The last window
# is shorter when fewer than bptt rows are left.
def get_batch(source, i, bptt):
    seq_len = min(bptt, len(source) - 1 - i)
    data = source[i:i + seq_len]
    target = source[i + 1:i + 1 + seq_len].reshape(-1)
    return data, target
