"""Time data.Corpus against the per-element loop of the classic example, same data, same run.

Each load runs in a fresh process (cold: nothing cached in Python), alternating
the two, and the OS page cache is dropped first where that is allowed. Run from the
repository root:

    python3 -m benchmarks.corpus --data ./data/wikitext-2 --repeats 3
    python3 -m benchmarks.corpus --data ./data/wikitext-2 --scale 50   # train.txt 50 times over: ~100M tokens
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import torch

import data
from plumbing import cli, wikitext
from plumbing.errors import DataError, UsageError

PROG = 'python3 -m benchmarks.corpus'
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def per_element_corpus(path):
    """The classic tokenizer: one pass to build the dictionary, one to fill the tensor element by element."""
    dictionary = data.Dictionary()
    splits = {}
    for split in wikitext.SPLITS:
        file = os.path.join(path, f'{split}.txt')
        with open(file, encoding='utf-8') as f:
            ntokens = 0
            for line in f:
                for word in line.split() + [wikitext.EOS]:
                    dictionary.add_word(word)
                    ntokens += 1
        ids = torch.LongTensor(ntokens)
        with open(file, encoding='utf-8') as f:
            token = 0
            for line in f:
                for word in line.split() + [wikitext.EOS]:
                    ids[token] = dictionary.word2idx[word]
                    token += 1
        splits[split] = ids
    return dictionary, splits


def load_once(method, path):
    start = time.perf_counter()
    if method == 'corpus':
        corpus = data.Corpus(path, pad_to_multiple_of=8)
        sizes = [len(corpus.train), len(corpus.valid), len(corpus.test), len(corpus.dictionary)]
    else:
        dictionary, splits = per_element_corpus(path)
        sizes = [len(splits['train']), len(splits['valid']), len(splits['test']), len(dictionary)]
    return {'method': method, 'seconds': time.perf_counter() - start, 'sizes': sizes}


def drop_page_cache():
    try:
        os.sync()
        with open('/proc/sys/vm/drop_caches', 'w') as f:
            f.write('3\n')
        return True
    except OSError:
        return False


def parse_args(argv):
    parser = cli.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument('--data', default=wikitext.DEFAULT_DATA, help='directory holding train.txt, valid.txt and test.txt')
    parser.add_argument('--repeats', type=int, default=3, help='loads of each method, alternating')
    parser.add_argument('--scale', type=int, default=0,
                        help='only time Corpus on a copy whose train.txt is the original repeated N times')
    parser.add_argument('--keep-page-cache', action='store_true',
                        help='do not drop the OS page cache before each load (warm file reads)')
    parser.add_argument('--one', choices=['corpus', 'per-element'], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not os.path.isdir(args.data):
        raise UsageError(f'--data {args.data}: no such directory.')
    cli.check_at_least_1(args, ('--repeats',))
    if args.scale < 0:
        raise UsageError(f'--scale must not be negative (got {args.scale}).')
    return args


def load_in_own_process(method, args):
    """load_once(method) in a fresh Python: `python3 -m benchmarks.corpus --one method`, in the
    same directory, with the repository root on PYTHONPATH."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get('PYTHONPATH')])))
    return subprocess.run([sys.executable, '-m', 'benchmarks.corpus', '--data', args.data, '--one', method],
                          capture_output=True, text=True, env=env)


def main(argv=None):
    args = parse_args(argv)
    drop = (lambda: False) if args.keep_page_cache else drop_page_cache
    if args.one:
        print(json.dumps(load_once(args.one, args.data)))
        return 0
    if args.scale:
        missing = [f'{s}.txt' for s in wikitext.SPLITS if not os.path.isfile(os.path.join(args.data, f'{s}.txt'))]
        if missing:
            raise DataError(f'{args.data} has no {" or ".join(missing)}.')
        with tempfile.TemporaryDirectory() as big:
            with open(os.path.join(big, 'train.txt'), 'wb') as out:
                for _ in range(args.scale):
                    with open(os.path.join(args.data, 'train.txt'), 'rb') as f:
                        shutil.copyfileobj(f, out)
            for split in ('valid', 'test'):
                shutil.copy(os.path.join(args.data, f'{split}.txt'), big)
            drop()
            result = load_once('corpus', big)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f'| Corpus on train.txt x{args.scale}: {result["seconds"]:.1f} s for {sum(result["sizes"][:3]):,} tokens, '
              f'{result["sizes"][3]} words, peak RSS {peak:.2f} GiB')
        return 0
    results = {'corpus': [], 'per-element': []}
    for r in range(args.repeats):
        for method in results:
            dropped = drop()
            out = load_in_own_process(method, args)
            if out.returncode:
                sys.stderr.write(out.stderr)
                return cli.report_error(f'the {method} load failed in its own process (exit code {out.returncode}).', 1, PROG)
            result = json.loads(out.stdout)
            results[method].append(result['seconds'])
            print(f'| repeat {r + 1}/{args.repeats} | {method:11s} | {result["seconds"]:6.2f} s '
                  f'| train/valid/test/words {result["sizes"]} | page cache dropped: {dropped}', flush=True)
    best = {m: min(t) for m, t in results.items()}
    print(f'| best of {args.repeats}: Corpus {best["corpus"]:.2f} s, per-element loop {best["per-element"]:.2f} s, '
          f'speed-up {best["per-element"] / best["corpus"]:.1f}x')
    return 0


if __name__ == '__main__':
    sys.exit(cli.guarded_main(main, prog=PROG))
