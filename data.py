"""WikiText-style corpus: a dictionary of words, the train/valid/test token streams, and how a
stream is cut into batches (batchify, get_batch)."""
from plumbing import wikitext


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
    """The train, valid and test splits of a directory as 1-D tensors of token ids, with one Dictionary for all."""

    def __init__(self, path, pad_to_multiple_of=1):
        self.dictionary = Dictionary()
        files = wikitext.split_files(path)
        # Each line becomes its words (split at whitespace) followed by <eos>; a word the dictionary
        # does not know yet gets the next id. The reader streams the file (plumbing/wikitext.py).
        self.train = wikitext.token_ids(files['train'], self.dictionary)
        self.valid = wikitext.token_ids(files['valid'], self.dictionary)
        self.test = wikitext.token_ids(files['test'], self.dictionary)
        self.dictionary.pad_to_multiple_of(pad_to_multiple_of)


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
