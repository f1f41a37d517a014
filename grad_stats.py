"""How many of a trained model's gradients fp16 would lose, at each loss scale: the picture behind
loss scaling (Micikevicius et al., Mixed Precision Training, 2018; apex reports test ppl ~93 with
loss scale 1 against ~90 with 128).

A few batches of the text run through the checkpoint's model in fp32, in train mode (dropout as in
training: these are the gradients an update sees), and the unscaled mean cross-entropy is
backpropagated. Collected: the gradient of every weight, and the gradients of the activations
that an fp16 model's backward writes in fp16 (the embedding output, the RNN's input and output,
the decoder's input, the logits). The LSTM's gates and the state between its layers stay inside
one kernel; their gradients cannot be hooked and are not counted.

A loss scale S multiplies every gradient by S (exactly, for a power of 2), so the fp32 gradients
are collected once and each S is applied to them. fp16 holds |g * S| as

    flushed     below 2**-24, its smallest subnormal: the value becomes 0
    subnormal   2**-24 up to 2**-14, its smallest normal: kept, with fewer significant bits
    normal      2**-14 up to 65504, its largest finite value
    overflow    above 65504: inf, and the update is skipped

(rounding to nearest moves each edge by half a step: values from 2**-25 round up to 2**-24, and
only from 65520 to inf). Gradients that are exactly 0 (rows of the embedding for words not in
the batch, activations that dropout removed) are 0 in any precision: they are counted apart,
and the shares are of the nonzero values. Each gradient is classified as if it were the only one
rounded to fp16; in an fp16 backward, the activations' gradients that were flushed are also
missing in the gradients computed from them, so the losses compound.

    python grad_stats.py --checkpoint model.pt --out grad_stats.png
"""
import math
import os
import sys

import torch

import data
import training
from model import repackage_hidden
from plumbing import checkpoint, cli, wikitext
from plumbing.errors import DataError, UsageError
from plumbing.files import atomic_write

FP16_SMALLEST_SUBNORMAL = 2.0 ** -24
FP16_SMALLEST_NORMAL = 2.0 ** -14
FP16_MAX = 65504.0
FP32_SMALLEST_SUBNORMAL = 2.0 ** -149  # nonzero fp32 values are at least this
CLASSES = ('zero', 'flushed', 'subnormal', 'normal', 'overflow')
NONZERO_CLASSES = CLASSES[1:]

# The histogram of log2|g| spans every nonzero finite fp32 value (2**-149 .. below 2**128) in 1/8 of a binade.
LOG2_LOW, LOG2_HIGH, BINS_PER_UNIT = -150, 128, 8
NBINS = (LOG2_HIGH - LOG2_LOW) * BINS_PER_UNIT
PERCENTILES = (1, 10, 50, 90, 99)
PLOT_SCALE = 128  # the picture shows the histogram at scale 1 and shifted by log2 of this: apex's static scale


def parse_args(argv):
    p = cli.ArgumentParser(description='The share of gradients fp16 would flush to zero, keep as subnormals '
                                            'or overflow, at several loss scales, for a trained model')
    p.add_argument('--checkpoint', type=str, default='./model.pt', help='best-model checkpoint written by a training script')
    p.add_argument('--data', type=str, default=wikitext.DEFAULT_DATA,
                   help='directory holding train.txt, valid.txt and test.txt: the corpus the model was trained on')
    p.add_argument('--split', choices=wikitext.SPLITS, default='train', help='which text the batches are read from')
    p.add_argument('--batches', type=int, default=10, help='how many batches to run, from the start of the split')
    p.add_argument('--batch_size', type=int, default=None, metavar='N',
                   help="columns of the text (default: the checkpoint's training --batch_size, else 24)")
    p.add_argument('--bptt', type=int, default=None, help="time steps per batch (default: the checkpoint's, else 35)")
    p.add_argument('--scales', type=str, default='1,8,128,1024,65536', help='loss scales to report, separated by commas')
    p.add_argument('--seed', type=int, default=1111, help="seed for dropout's masks")
    p.add_argument('--out', type=str, default=None, metavar='PNG',
                   help='draw the histogram of log2|g| with fp16\'s limits here (needs requirements-plot.txt)')
    cli.add_device_flags(p)
    args = p.parse_args(argv)
    cli.check_at_least_1(args, ('--batches', '--batch_size', '--bptt'))
    args.scales = parse_scales(args.scales)
    cli.check_seed(args.seed)
    cli.check_checkpoint_file(args.checkpoint)
    if not cli.uses_default_data(args.data) and not os.path.isdir(args.data):
        raise UsageError(f'--data {args.data}: no such directory.')
    if args.out is not None:
        cli.require_matplotlib('--out')  # checked before the minutes of work, not after them
        data_files = [('--data', os.path.join(args.data, f'{split}.txt')) for split in wikitext.SPLITS]
        cli.check_output_file('--out', args.out, [('--checkpoint', args.checkpoint), *data_files])
        # The picture shows scales 1 and PLOT_SCALE, with their shares.
        args.scales = sorted({*args.scales, 1.0, float(PLOT_SCALE)})
    return args


def parse_scales(text):
    try:
        scales = [float(s) for s in text.split(',')]
    except ValueError:
        scales = []
    # Beyond 2**64, 2**-24 / S would fall out of fp32's normal range.
    if not scales or not all(1 <= s <= 2 ** 64 for s in scales):
        raise UsageError(f'--scales must be numbers from 1 to 2**64, separated by commas (got {text!r}).')
    return sorted(set(scales))


# ---------------------------------------------------------------- counting

def fp16_counts(values, scales):
    """{scale: {class: count}}: how many of the fp32 values, multiplied by the scale, fp16 would hold in each of
    CLASSES: zero (exactly 0 before scaling), flushed, subnormal, normal, overflow (NaN and inf included)."""
    magnitude = values.detach().flatten().float().abs()
    # |g| * S < limit  <=>  |g| < limit / S, exact for a power-of-2 S (else to fp32's rounding of limit / S). All the
    # scales' edges go into one sorted list, and one pass over the values counts those below each edge. The overflow
    # edge is the fp32 number after 65504 / S, so that 65504 itself is normal.
    edges = {scale: (float32(FP16_SMALLEST_SUBNORMAL / scale), float32(FP16_SMALLEST_NORMAL / scale),
                     float32(FP16_MAX / scale, after=True)) for scale in scales}
    sorted_edges = sorted({FP32_SMALLEST_SUBNORMAL, *(edge for three in edges.values() for edge in three)})
    bucket = torch.bucketize(magnitude, torch.tensor(sorted_edges, device=magnitude.device), right=True)
    in_bucket = torch.bincount(bucket, minlength=len(sorted_edges) + 1)
    below = dict(zip(sorted_edges, in_bucket.cumsum(0).tolist()))  # how many values lie below each edge
    zero, total = below[FP32_SMALLEST_SUBNORMAL], magnitude.numel()
    return {scale: {'zero': zero, 'flushed': below[subnormal] - zero, 'subnormal': below[normal] - below[subnormal],
                    'normal': below[overflow] - below[normal], 'overflow': total - below[overflow]}
            for scale, (subnormal, normal, overflow) in edges.items()}


def float32(x, after=False):
    """x rounded to fp32, or the fp32 number after that."""
    rounded = torch.tensor(x, dtype=torch.float32)
    return (torch.nextafter(rounded, torch.tensor(math.inf)) if after else rounded).item()


class Tally:
    """fp16_counts at each scale, and a histogram of log2|g|, summed over the gradients added."""

    def __init__(self, scales):
        self.values = 0
        self.counts = {scale: dict.fromkeys(CLASSES, 0) for scale in scales}
        self.histogram = torch.zeros(NBINS, dtype=torch.int64)  # of the nonzero finite values
        self.log2_min, self.log2_max = math.inf, -math.inf

    def add(self, grad):
        values = grad.detach().float().flatten()
        self.values += values.numel()
        for scale, counts in fp16_counts(values, self.counts).items():
            for name, n in counts.items():
                self.counts[scale][name] += n
        log2 = values[(values != 0) & values.isfinite()].abs().log2()
        if log2.numel():
            bins = ((log2 - LOG2_LOW) * BINS_PER_UNIT).long()
            self.histogram += torch.bincount(bins, minlength=NBINS).cpu()
            self.log2_min = min(self.log2_min, log2.min().item())
            self.log2_max = max(self.log2_max, log2.max().item())

    def absorb(self, other):
        self.values += other.values
        for scale, counts in self.counts.items():
            for name in CLASSES:
                counts[name] += other.counts[scale][name]
        self.histogram += other.histogram
        self.log2_min, self.log2_max = min(self.log2_min, other.log2_min), max(self.log2_max, other.log2_max)

    @property
    def nonzero(self):
        any_scale = next(iter(self.counts.values()))  # the zeros are the same at every scale
        return self.values - any_scale['zero']

    def shares(self, scale):
        """The share of the nonzero values in each of NONZERO_CLASSES at this scale."""
        return {name: self.counts[scale][name] / max(self.nonzero, 1) for name in NONZERO_CLASSES}

    def log2_percentile(self, percent):
        """log2|g| below which percent of the nonzero finite values lie, to the histogram's 1/8: its bin's middle,
        or the smallest or largest value where that lies in the bin."""
        cumulative = self.histogram.cumsum(0)
        rank = max(1, math.ceil(percent / 100 * cumulative[-1].item()))
        first_bin = torch.searchsorted(cumulative, rank).item()
        return min(max(LOG2_LOW + (first_bin + 0.5) / BINS_PER_UNIT, self.log2_min), self.log2_max)


def combined(tallies, scales):
    total = Tally(scales)
    for tally in tallies:
        total.absorb(tally)
    return total


class ActivationGrads:
    """On every forward, hooks the gradients of the activations that an fp16 model's backward writes in fp16,
    each into its own Tally (the module's docstring names them)."""

    def __init__(self, model, scales):
        body, kind = (model.rnn, 'RNN') if hasattr(model, 'rnn') else (model.transformer, 'Transformer')
        self.tallies = {name: Tally(scales) for name in
                        ('embedding output', f'{kind} input', f'{kind} output', 'decoder input', 'logits')}
        self.watched = []  # this forward's: dropout 0 passes its input on, and one tensor's gradient is counted once
        model.encoder.register_forward_hook(self.hook(None, 'embedding output'))
        body.register_forward_hook(self.hook(f'{kind} input', f'{kind} output'))
        model.decoder.register_forward_hook(self.hook('decoder input', 'logits'))

    def hook(self, input_name, output_name):
        """A forward hook that watches the module's first input (unless input_name is None) and its output."""
        def forward_hook(module, inputs, output):
            if input_name is not None:
                self.watch(input_name, inputs[0])
            self.watch(output_name, output[0] if isinstance(output, tuple) else output)  # an RNN's (output, hidden)
        return forward_hook

    def watch(self, name, tensor):
        if any(tensor is seen for seen in self.watched):
            return
        self.watched.append(tensor)
        tensor.register_hook(self.tallies[name].add)  # add returns None: the gradient flows on unchanged

    def backward_done(self):
        self.watched.clear()


# ---------------------------------------------------------------- the text, the batches

def saved_batch_shape(args, ckpt):
    """--batch_size and --bptt, or else those the checkpoint was trained with, or else the training scripts' defaults."""
    saved = ckpt.get('args')
    saved = saved if isinstance(saved, dict) else {}
    shape = {}
    for name, default in (('batch_size', 24), ('bptt', 35)):
        value, source = getattr(args, name), f'--{name}'
        if value is None:
            value, source = saved.get(name), "the checkpoint's"
            if type(value) is not int or value < 1:
                value, source = default, 'default'
        shape[name] = (value, source)
    return shape


def read_tokens(args, idx2word):
    """The --split text as ids of the checkpoint's vocabulary. A word that vocabulary lacks is an error: the model
    was trained on another corpus, and neither mapping it to <unk> nor dropping it measures the training's gradients."""
    if cli.uses_default_data(args.data):
        wikitext.download_wikitext2(args.data)
    corpus = data.Corpus(args.data)
    tokens = getattr(corpus, args.split)
    word2idx = {word: i for i, word in enumerate(idx2word)}
    to_checkpoint = torch.tensor([word2idx.get(word, -1) for word in corpus.dictionary.idx2word], dtype=torch.int64)
    ids = to_checkpoint[tokens]
    unknown = tokens[ids < 0].unique()
    if len(unknown):
        raise DataError(f"{os.path.join(args.data, args.split + '.txt')} has words that the checkpoint's "
                             f"vocabulary lacks ({len(unknown)} different; the first: "
                             f'{corpus.dictionary.idx2word[unknown[0]]!r}); give the --data the model was trained on.')
    return ids


# ---------------------------------------------------------------- the report

def percent(share):
    if share == 0:
        return '0'
    if share < 5e-6:
        return '<0.001%'  # not 0.000%: a few overflowing values are enough to skip an update
    return f'{100 * share:.3f}%'


def print_percentiles(groups):
    """groups: (group name, its Tally, {name: Tally}) for the weights and the activations."""
    print(f"\nlog2|g| of the nonzero gradients (percentiles to 1/8; fp16 holds -24 .. 16 at scale 1, normal from -14; "
          f"a scale S adds log2 S):")
    rows = [row for group, total, parts in groups for row in ((group, total), *((f'  {name}', tally)
                                                                               for name, tally in parts.items()))]
    width = max(len(name) for name, _ in rows) + 2
    header = ''.join(f'{f"{p}%":>8}' for p in PERCENTILES)
    print(f"{'':<{width}}{'values':>13}{'nonzero':>9}{'min':>8}{header}{'max':>8}")
    for name, tally in rows:
        if tally.nonzero == 0:
            print(f'{name:<{width}}{tally.values:>13,}{0:>9}')
            continue
        spread = ''.join(f'{tally.log2_percentile(p):8.1f}' for p in PERCENTILES)
        print(f'{name:<{width}}{tally.values:>13,}{percent(tally.nonzero / tally.values):>9}'
              f'{tally.log2_min:8.1f}{spread}{tally.log2_max:8.1f}')


def print_shares(groups, scales):
    """groups: (name, Tally) pairs, one row each at every scale."""
    print('\nShare of the nonzero gradient values that fp16 would flush to 0 (|g*S| < 2**-24), keep as subnormals '
          '(< 2**-14), keep as normal numbers, or overflow to inf (> 65504), at loss scale S:')
    print(f"{'scale S':>9}  {'gradients of':<20}{''.join(f'{name:>11}' for name in NONZERO_CLASSES)}")
    for scale in scales:
        for row, (name, tally) in enumerate(groups):
            shares = ''.join(f'{percent(share):>11}' for share in tally.shares(scale).values())
            print(f"{f'{scale:.10g}' if row == 0 else '':>9}  {name:<20}{shares}")


def draw(path, panels):
    """For each (title, Tally) of panels, the histogram of log2|g| at scale 1 and shifted by log2(PLOT_SCALE),
    between fp16's limits; to path (PNG)."""
    from matplotlib.figure import Figure
    shift = math.log2(PLOT_SCALE)
    edges = (LOG2_LOW + torch.arange(NBINS + 1, dtype=torch.float64) / BINS_PER_UNIT).numpy()
    low = min(-40.0, min(tally.log2_min for _, tally in panels) - 1)  # room at the left for the legend
    high = max(18.0, max(tally.log2_max for _, tally in panels) + shift + 1)
    limits = {'2$^{-24}$': -24, '2$^{-14}$': -14, '65504': math.log2(FP16_MAX)}
    figure = Figure(figsize=(11, 3.2 * len(panels)), layout='constrained')
    axes = figure.subplots(len(panels), 1, sharex=True)
    for ax, (title, tally) in zip(axes, panels):
        density = (tally.histogram.double() * BINS_PER_UNIT / max(tally.nonzero, 1)).numpy()  # share per binade
        ax.axvspan(low, -24, color='tab:red', alpha=0.10, lw=0)
        ax.axvspan(-24, -14, color='tab:orange', alpha=0.10, lw=0)
        ax.axvspan(math.log2(FP16_MAX), high, color='tab:red', alpha=0.10, lw=0)
        for scale, style in ((1, dict(fill=True, alpha=0.55, color='tab:blue')),
                             (PLOT_SCALE, dict(color='tab:green', lw=1.5))):
            shares = tally.shares(float(scale))
            ax.stairs(density, edges + math.log2(scale), **style,
                      label=f"loss scale {scale}: {percent(shares['flushed'])} flushed to 0,\n"
                            f"{percent(shares['subnormal'])} subnormal, {percent(shares['overflow'])} overflow")
        for label, x in limits.items():
            ax.axvline(x, color='black', lw=0.8, ls='--')
            ax.annotate(label, (x, 1), xycoords=('data', 'axes fraction'), xytext=(3, -12),
                        textcoords='offset points', fontsize=9)
        ax.annotate('', xy=(-24 + shift, 0.8), xytext=(-24, 0.8), xycoords=('data', 'axes fraction'),
                    arrowprops=dict(arrowstyle='->', color='tab:green'))
        ax.annotate(f'x{PLOT_SCALE}: +{shift:g}', (-24 + shift / 2, 0.8), xycoords=('data', 'axes fraction'),
                    xytext=(0, 3), textcoords='offset points', ha='center', va='bottom', fontsize=9, color='tab:green')
        ax.set_title(f'{title}: {tally.nonzero:,} nonzero values of {tally.values:,}', loc='left', fontsize=10)
        ax.set_ylabel('share per binade')
        ax.set_xlim(low, high)
        ax.set_ylim(bottom=0)
        ax.legend(loc='upper left', bbox_to_anchor=(0, 0.92), fontsize=8.5, frameon=False)
    axes[-1].set_xlabel('log2 |gradient|   (shaded: flushed to 0 and overflow in red, subnormal in orange)')
    with atomic_write(path) as f:
        figure.savefig(f, format='png', dpi=110)


# ---------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    device = cli.select_device(args)
    ckpt = checkpoint.load(args.checkpoint)
    shape = saved_batch_shape(args, ckpt)
    (batch_size, batch_size_from), (bptt, bptt_from) = shape['batch_size'], shape['bptt']
    model, idx2word, _ = checkpoint.model_from(ckpt, args.checkpoint)
    cli.check_positions(model, bptt, bptt_from)
    tokens = read_tokens(args, idx2word)
    if len(tokens) // batch_size < 2:
        raise UsageError(f'--batch_size {batch_size} is too large for the {args.split} split ({len(tokens)} tokens): '
                             f'each of the {batch_size} columns needs at least 2 tokens.')
    source = data.batchify(tokens, batch_size).to(device)
    starts = range(0, source.size(0) - 1, bptt)[:args.batches]
    model.to(device).train()  # dropout as in training: the gradients an update sees
    torch.manual_seed(args.seed)
    activations = ActivationGrads(model, args.scales)
    weights = {name: Tally(args.scales) for name, _ in model.named_parameters()}

    print(f'| checkpoint {args.checkpoint} | {model.rnn_type}, {model.nlayers} layers, nhid {model.nhid}, '
          f'vocabulary {len(idx2word)} | device {device}')
    print(f'| {len(starts)} batches of {bptt} x {batch_size} tokens from the start of {args.split} '
          f'(bptt {bptt_from}, batch size {batch_size_from}) | train mode, dropout {model.drop.p:g} | seed {args.seed}',
          flush=True)
    hidden = model.init_hidden(batch_size)
    total_loss = 0.0
    for start in starts:
        inputs, targets = data.get_batch(source, start, bptt)
        hidden = repackage_hidden(hidden)  # carried over from the previous batch, as in training
        output, hidden = model(inputs, hidden)
        loss = training.cross_entropy(output.view(-1, output.size(-1)), targets)
        loss.backward()  # the activations' gradients reach their tallies here
        activations.backward_done()
        for name, param in model.named_parameters():
            weights[name].add(param.grad)
        model.zero_grad(set_to_none=True)
        total_loss += loss.item()
    print(f'| fp32 gradients of the unscaled mean cross-entropy (mean loss {total_loss / len(starts):.2f}); '
          f'a loss scale S multiplies each by S')

    # The logits hold most activation values, and theirs are the smallest gradients: they are shown apart.
    weights_total = combined(weights.values(), args.scales)
    activations_total = combined(activations.tallies.values(), args.scales)
    logits = activations.tallies['logits']
    others = [name for name in activations.tallies if name != 'logits']
    other_activations = combined([activations.tallies[name] for name in others], args.scales)
    print_percentiles([('weights', weights_total, weights), ('activations', activations_total, activations.tallies)])
    print_shares([('weights', weights_total), ('activations', activations_total), ('  logits', logits),
                  ('  the others', other_activations)], args.scales)
    if args.out is not None:
        draw(args.out, [('weight gradients', weights_total), ('logit gradients', logits),
                        (f"gradients of the other activations ({', '.join(others)})", other_activations)])
        print(f'\n| histograms of log2|g| at loss scales 1 and {PLOT_SCALE} written to {args.out}')


if __name__ == '__main__':
    sys.exit(cli.guarded_main(main))
