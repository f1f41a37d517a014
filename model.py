"""The word-level language models: embedding -> multi-layer RNN -> linear decoder (RNNModel),
and embedding -> causal Transformer encoder -> linear decoder (TransformerModel)."""
import functools
import math
import warnings

import torch
import torch.nn as nn

RNN_TYPES = ('LSTM', 'GRU', 'RNN_TANH', 'RNN_RELU')
MODEL_TYPES = (*RNN_TYPES, 'Transformer')


def build_model(rnn_type, ntoken, ninp, nhid, nlayers, dropout=0.5, tie_weights=False, nhead=None):
    """RNNModel, or TransformerModel with nhead heads for rnn_type 'Transformer' (the RNNs take no nhead)."""
    if rnn_type == 'Transformer':
        return TransformerModel(ntoken, ninp, nhead, nhid, nlayers, dropout, tie_weights)
    return RNNModel(rnn_type, ntoken, ninp, nhid, nlayers, dropout, tie_weights)


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
        init_weights(self.encoder, self.decoder)


    def forward(self, input, hidden):
        """input [seq_len, batch] of ids -> logits [seq_len, batch, ntoken], new hidden."""
        emb = self.drop(self.encoder(input))
        device_type = input.device.type
        dtype = None
        if torch.is_autocast_enabled(device_type):
            dtype = rnn_dtype(self.rnn_type, device_type, torch.get_autocast_dtype(device_type),
                              device_type == 'cuda' and cudnn_runs_bf16_rnn(input.device))
        if dtype is None:
            output, hidden = self.rnn(emb, hidden)
        else:
            with torch.autocast(device_type, enabled=False):
                output, hidden = run_rnn_in(self.rnn, dtype, emb, hidden)
        return self.decoder(self.drop(output)), hidden

    def init_hidden(self, bsz):
        weight = self.encoder.weight
        shape = (self.nlayers, bsz, self.nhid)
        if self.rnn_type == 'LSTM':
            return (weight.new_zeros(shape), weight.new_zeros(shape))
        return weight.new_zeros(shape)


def rnn_dtype(rnn_type, device_type, autocast_dtype, cudnn_bf16=True):
    """The dtype an RNN runs in under autocast to autocast_dtype, where the model chooses it instead of
    autocast; None leaves it to autocast. cudnn_bf16: whether cuDNN has bf16 RNN kernels (CUDA only)."""
    if autocast_dtype == torch.bfloat16 and device_type == 'cuda':
        # Autocast's wrapper for cuDNN RNNs casts to fp16 whatever the autocast dtype, which would run
        # --bf16's RNN in fp16 without a loss scale. cuDNN 9.13 on Ampere or later has bf16 RNNs;
        # without them, fp32 (TF32 where allowed) is the safe precision.
        return torch.bfloat16 if cudnn_bf16 else torch.float32
    if autocast_dtype == torch.bfloat16 and device_type == 'cpu':
        # Under CPU bf16 autocast an LSTM fed fp32 goes to oneDNN, which fails on a CPU without
        # AVX-512 (an AVX2 EPYC: "could not create a primitive descriptor"); fed bf16 it runs in bf16.
        return torch.bfloat16
    if autocast_dtype == torch.float16 and device_type == 'cpu' and rnn_type == 'LSTM':
        # oneDNN has no fp16 LSTM kernel: under CPU fp16 autocast the LSTM runs in fp32.
        return torch.float32
    return None


@functools.cache
def cudnn_runs_bf16_rnn(device):
    """Whether cuDNN runs bf16 RNNs on this device: PyTorch sends them to cuDNN from cuDNN 9.13, on
    compute capability 8.0 or later (pytorch/pytorch#164411)."""
    return (torch.backends.cudnn.is_available() and torch.backends.cudnn.version() >= 91300
            and torch.cuda.get_device_capability(device) >= (8, 0))


def run_rnn_in(rnn, dtype, input, hidden):
    """rnn(input, hidden) computed in dtype: input, hidden and a copy of the weights in dtype. The copy is
    made inside the graph, so the gradients reach the fp32 weights."""
    if hidden is not None:
        hidden = tuple(h.to(dtype) for h in hidden) if isinstance(hidden, tuple) else hidden.to(dtype)
    weights = {name: p.to(dtype) for name, p in rnn.named_parameters()}
    with warnings.catch_warnings():
        # The copies are not one flat buffer, so cuDNN packs them into one per call (and warns each
        # time): one copy more than autocast's fp16 wrapper, which casts straight into a flat buffer.
        # The weights are a small part of a step's memory traffic; the GPU check's benchmark measures it.
        warnings.filterwarnings('ignore', message='RNN module weights are not part of single contiguous chunk')
        return torch.func.functional_call(rnn, weights, (input.to(dtype), hidden))


def init_weights(encoder, decoder):
    """Small uniform embedding and decoder weights, zero decoder bias (the RNN's and attention's own init stays)."""
    nn.init.uniform_(encoder.weight, -0.1, 0.1)
    nn.init.uniform_(decoder.weight, -0.1, 0.1)
    nn.init.zeros_(decoder.bias)


def repackage_hidden(h):
    """Detach hidden states from the graph of the batch that produced them (None, the Transformer's, stays None)."""
    if h is None:
        return None
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)


class TransformerModel(nn.Module):
    """A causal Transformer language model: embedding * sqrt(ninp) + sinusoidal positions -> nlayers of
    nn.TransformerEncoderLayer(ninp, nhead, nhid) under a causal mask -> linear decoder.

    It has RNNModel's interface so one training loop serves both: forward(input, hidden) returns
    (logits, None) and init_hidden returns None, since each batch is attended to on its own.
    The decoder reads ninp-wide outputs, so tie_weights works whatever nhid (the feed-forward width) is.
    """
    rnn_type = 'Transformer'
    MAX_LEN = 5000  # positions the encoding table holds: the longest input (--bptt, generate.py's context)

    def __init__(self, ntoken, ninp, nhead, nhid, nlayers, dropout=0.5, tie_weights=False):
        super().__init__()
        if ninp % nhead:
            raise ValueError(f'--emsize must be a multiple of --nhead (got emsize {ninp}, nhead {nhead}).')
        self.nhead = nhead
        self.nhid = nhid
        self.nlayers = nlayers
        self.encoder = nn.Embedding(ntoken, ninp)
        # Not saved in checkpoints (persistent=False): it is a function of ninp only.
        self.register_buffer('positions', sinusoidal_positions(self.MAX_LEN, ninp), persistent=False)
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(ninp, nhead, nhid, dropout)
        # Nested tensors need batch_first layers; ours take [seq, batch] like the RNNs.
        self.transformer = nn.TransformerEncoder(layer, nlayers, enable_nested_tensor=False)
        self.decoder = nn.Linear(ninp, ntoken)
        if tie_weights:
            self.decoder.weight = self.encoder.weight
        init_weights(self.encoder, self.decoder)


    def forward(self, input, hidden=None):
        """input [seq_len, batch] of ids -> logits [seq_len, batch, ntoken], None."""
        seq_len = input.size(0)
        if seq_len > self.MAX_LEN:
            raise ValueError(f'the Transformer takes at most {self.MAX_LEN} positions (got {seq_len}).')
        emb = self.encoder(input) * math.sqrt(self.encoder.embedding_dim)
        x = self.drop(emb + self.positions[:seq_len, None, :])
        # Position i attends to positions 0..i only; is_causal lets attention use its causal kernel.
        mask = nn.Transformer.generate_square_subsequent_mask(seq_len, device=x.device, dtype=x.dtype)
        return self.decoder(self.transformer(x, mask=mask, is_causal=True)), None

    def init_hidden(self, bsz):
        return None

    def half(self):
        """fp16 weights for the classic fp16 recipes, except the LayerNorms': their few weights stay fp32,
        as apex kept batch norm, and layer_norm takes fp16 input with fp32 weights, returning fp16."""
        super().half()
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                module.float()
        return self


def sinusoidal_positions(length, width):
    """[length, width]: sin and cos of position / 10000^(2i / width), the encoding of Vaswani et al. (2017)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
    table = torch.zeros(length, width)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[:width // 2])
    return table
