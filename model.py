"""The word-level language model: embedding -> multi-layer RNN -> linear decoder."""
import torch
import torch.nn as nn

RNN_TYPES = ('LSTM', 'GRU', 'RNN_TANH', 'RNN_RELU')


class RNNModel(nn.Module):
    def __init__(self, rnn_type, ntoken, ninp, nhid, nlayers, dropout=0.5, tie_weights=False):
        super().__init__()
        if rnn_type not in RNN_TYPES:
            raise ValueError(f"unknown rnn type {rnn_type!r}; choose one of {', '.join(RNN_TYPES)}.")
        if tie_weights and nhid != ninp:
            raise ValueError(f'--tied needs --emsize equal to --nhid (got emsize {ninp}, nhid {nhid}).')
        self.rnn_type = rnn_type
        self.nhid = nhid
        self.nlayers = nlayers
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        if rnn_type in ('LSTM', 'GRU'):
            self.rnn = getattr(nn, rnn_type)(ninp, nhid, nlayers, dropout=dropout)
        else:
            nonlinearity = rnn_type[len('RNN_'):].lower()
            self.rnn = nn.RNN(ninp, nhid, nlayers, nonlinearity=nonlinearity, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        # Tying the output projection to the input embedding (Press & Wolf 2016,
        # Inan et al. 2016) saves ntoken * nhid parameters and usually lowers perplexity.
        if tie_weights:
            self.decoder.weight = self.encoder.weight
        self.init_weights()

    def init_weights(self):
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, input, hidden):
        """input [seq_len, batch] of ids -> logits [seq_len, batch, ntoken], new hidden."""
        emb = self.drop(self.encoder(input))
        if self.rnn_type == 'LSTM' and input.device.type == 'cpu' and torch.is_autocast_enabled('cpu') \
                and torch.get_autocast_dtype('cpu') == torch.float16:
            # oneDNN has no fp16 LSTM kernel: under CPU fp16 autocast the LSTM runs in fp32.
            with torch.autocast('cpu', enabled=False):
                output, hidden = self.rnn(emb.float(), hidden)
        else:
            output, hidden = self.rnn(emb, hidden)
        return self.decoder(self.drop(output)), hidden

    def init_hidden(self, bsz):
        weight = self.encoder.weight
        shape = (self.nlayers, bsz, self.nhid)
        if self.rnn_type == 'LSTM':
            return (weight.new_zeros(shape), weight.new_zeros(shape))
        return weight.new_zeros(shape)


def repackage_hidden(h):
    """Detach hidden states from the graph of the batch that produced them."""
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)
