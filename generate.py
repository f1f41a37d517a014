"""Sample words from a model trained by main.py or main_fp16_optimizer.py.

The vocabulary comes from the checkpoint; padding words (added only to round the
vocabulary up to a multiple of 8) are never sampled.
"""
import argparse
import os
import sys
import tempfile

import torch

import checkpoint

parser = argparse.ArgumentParser(description='Generate text with a trained word-level language model')
parser.add_argument('--data', type=str, default='./data/wikitext-2',
                    help='accepted for the seed\'s command lines; unused, the vocabulary comes from the checkpoint')
parser.add_argument('--checkpoint', type=str, default='./model.pt', help='model checkpoint to use')
parser.add_argument('--outf', type=str, default='generated.txt', help='output file for generated text')
parser.add_argument('--words', type=int, default=1000, help='number of words to generate')
parser.add_argument('--seed', type=int, default=1111, help='random seed')
parser.add_argument('--cuda', action='store_true', help='use CUDA')
parser.add_argument('--temperature', type=float, default=1.0, help='temperature - higher will increase diversity')
parser.add_argument('--log-interval', type=int, default=100, help='reporting interval')
args = parser.parse_args()


def fail(message, code=1):
    print(f'{os.path.basename(sys.argv[0])}: error: {message}', file=sys.stderr)
    sys.exit(code)


if args.temperature < 1e-3:
    fail(f'--temperature must be at least 1e-3 (got {args.temperature:g}).', 2)
if args.words < 0:
    fail(f'--words must be 0 or more (got {args.words}).', 2)
if args.cuda and not torch.cuda.is_available():
    fail('--cuda was given but no CUDA device is available.')
if not os.path.isdir(os.path.dirname(os.path.abspath(args.outf))):
    fail(f'--outf {args.outf}: the directory does not exist.', 2)
device = torch.device('cuda' if args.cuda else 'cpu')
torch.manual_seed(args.seed)

try:
    model, idx2word, padding = checkpoint.load_model(args.checkpoint)
except checkpoint.CheckpointError as e:
    fail(str(e))
model.to(device).eval()

# Padding words get logit -inf, hence probability 0.
logit_mask = torch.zeros(len(idx2word), device=device)
logit_mask[padding] = float('-inf')
real_words = torch.tensor([i for i in range(len(idx2word)) if i not in set(padding)], device=device)

hidden = model.init_hidden(1)
token = real_words[torch.randint(len(real_words), (1,), device=device)].view(1, 1)

fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(args.outf)), prefix=f'.{os.path.basename(args.outf)}.', suffix='.tmp')
with os.fdopen(fd, 'w', encoding='utf-8') as outf, torch.no_grad():
    for i in range(args.words):
        logits, hidden = model(token, hidden)
        probs = torch.softmax(logits.view(-1) / args.temperature + logit_mask, dim=0)
        word_id = torch.multinomial(probs, 1).item()
        token.fill_(word_id)
        outf.write(idx2word[word_id] + ('\n' if i % 20 == 19 else ' '))
        if (i + 1) % args.log_interval == 0:
            print(f'| Generated {i + 1}/{args.words} words', flush=True)
    if args.words % 20:
        outf.write('\n')
os.replace(tmp, args.outf)
