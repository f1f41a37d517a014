"""Sample words from a model trained by main.py or main_fp16_optimizer.py.

The vocabulary comes from the checkpoint; padding words (added only to round the
vocabulary up to a multiple of 8) are never sampled. With --prompt the model reads the
prompt's words first and continues them; --outf holds the prompt on its first line.
"""
import signal
import string
import sys

import torch

from model import TransformerModel
from plumbing import checkpoint, cli
from plumbing.errors import UsageError
from plumbing.files import SaveLock, atomic_write
from plumbing.signals import StopRequest


def parse_args(argv):
    p = cli.ArgumentParser(description='Generate text with a trained word-level language model')
    p.add_argument('--data', type=str, default='./data/wikitext-2',
                   help="accepted for apex's command lines; unused, the vocabulary comes from the checkpoint")
    p.add_argument('--checkpoint', type=str, default='./model.pt', help='checkpoint written by a training script')
    p.add_argument('--outf', type=str, default='generated.txt', help='file the sampled words are written to')
    p.add_argument('--words', type=int, default=1000, help='how many words to sample')
    p.add_argument('--prompt', type=str, default='',
                   help='words to continue (split at whitespace): read by the model first, and written to --outf '
                        'on a line of their own before the sampled words; empty: start from a random word')
    p.add_argument('--seed', type=int, default=1111, help='seed for sampling')
    p.add_argument('--temperature', type=float, default=1.0,
                   help='divide the logits by this before sampling: above 1 gives more varied text, below 1 safer text')
    p.add_argument('--log-interval', type=int, default=100, help='print progress every N words')
    p.add_argument('--context', type=int, default=35,
                   help='a Transformer reads the last N words to sample the next (it was trained on --bptt words)')
    cli.add_device_flags(p)
    args = p.parse_args(argv)
    if not 1e-3 <= args.temperature < float('inf'):  # also rejects nan
        raise UsageError(f'--temperature must be a finite number of at least 1e-3 (got {args.temperature:g}).')
    if args.words < 0:
        raise UsageError(f'--words must be 0 or more (got {args.words}).')
    cli.check_at_least_1(args, ('--log-interval',))
    if not 1 <= args.context <= TransformerModel.MAX_LEN:
        raise UsageError(f'--context must be between 1 and {TransformerModel.MAX_LEN} (got {args.context}).')
    cli.check_seed(args.seed)
    cli.check_output_file('--outf', args.outf, [('--checkpoint', args.checkpoint)])
    cli.check_checkpoint_file(args.checkpoint)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = cli.select_device(args)
    torch.manual_seed(args.seed)
    model, idx2word, padding = checkpoint.load_model(args.checkpoint)
    model.to(device).eval()

    # Padding words get logit -inf, hence probability 0.
    logit_mask = torch.zeros(len(idx2word), device=device)
    logit_mask[padding] = float('-inf')
    padding_set = set(padding)
    real_words = torch.tensor([i for i in range(len(idx2word)) if i not in padding_set], device=device)
    prompt_words = args.prompt.split()
    prompt = prompt_ids(prompt_words, idx2word, padding_set, args.checkpoint)

    hidden = model.init_hidden(1)
    # The words the model reads next: one word and its hidden state for an RNN; for the Transformer,
    # which keeps no state, the last --context words.
    if prompt:  # read whole first: the logits after its last word give the first sampled word
        words = torch.tensor(prompt, device=device).view(-1, 1)
        if hidden is None:
            words = words[-args.context:]
    else:
        words = real_words[torch.randint(len(real_words), (1,), device=device)].view(1, 1)
    # A signal stops sampling after the current word; the words sampled so far are still written.
    # SaveLock: one generate.py per --outf.
    with StopRequest('word') as stop, SaveLock(args.outf, '--outf'):
        with atomic_write(args.outf, 'w', encoding='utf-8') as outf, torch.no_grad():
            if prompt:
                outf.write(' '.join(prompt_words) + '\n')  # a line of its own: the model's words start on the next
            generated = 0
            while generated < args.words and not stop.requested:
                logits, hidden = model(words, hidden)
                probs = torch.softmax(logits[-1].view(-1) / args.temperature + logit_mask, dim=0)
                word_id = torch.multinomial(probs, 1).item()
                word = torch.full((1, 1), word_id, device=device)
                words = word if hidden is not None else torch.cat([words, word])[-args.context:]
                generated += 1
                outf.write(idx2word[word_id] + ('\n' if generated % 20 == 0 else ' '))
                if generated % args.log_interval == 0:
                    print(f'| Generated {generated}/{args.words} words', flush=True)
            if generated % 20:
                outf.write('\n')
        if stop.requested:
            print(f'| stopped by {signal.Signals(stop.signum).name} after {generated} of {args.words} words; '
                  f'{generated} words written to {args.outf}', flush=True)
        return stop.exit_code


def prompt_ids(prompt_words, idx2word, padding, checkpoint_path):
    """The vocabulary indices of the prompt's words; words the model does not know are a usage error naming them."""
    known = {word: i for i, word in enumerate(idx2word) if i not in padding}  # padding words were never trained on
    unknown = list(dict.fromkeys(word for word in prompt_words if word not in known))  # each once, in order
    if unknown:
        quoted = ', '.join(f'"{word}"' for word in unknown)
        hint = '; <unk> stands for the words it does not know' if '<unk>' in known else ''
        if any(word.strip(string.punctuation) in known for word in unknown):
            hint += '; WikiText writes punctuation as words of their own ("city ," not "city,")'
        raise UsageError(f"--prompt: {quoted} {'is' if len(unknown) == 1 else 'are'} not in the vocabulary "
                             f'of {checkpoint_path}{hint}.')
    return [known[word] for word in prompt_words]


if __name__ == '__main__':
    sys.exit(cli.guarded_main(main))
