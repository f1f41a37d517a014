"""A Markdown table of finished runs from their SAVE.metrics.jsonl files, one row per run. Run from the repository root:

    python3 -m benchmarks.metrics_table results/*.metrics.jsonl

Columns: the recipe (as plot.py labels it), the model (type, width x layers), the processes
(torchrun's ranks), epochs, the best valid and the test perplexity, seconds per epoch (the mean
of the epoch records), median ms/batch over the progress lines, and updates skipped.
"""
import statistics
import sys

from plot import label, read_run
from plumbing import cli
from plumbing.errors import UsageError

PROG = 'python3 -m benchmarks.metrics_table'


def row(path):
    records = read_run(path)
    epochs = [r for r in records if r['kind'] == 'epoch']
    ends = [r for r in records if r['kind'] == 'end']
    if not epochs or not ends:
        raise UsageError(f'{path} holds no finished epoch and test: the run did not end.')
    train = [r for r in records if r['kind'] == 'train']
    ms = statistics.median(r['ms_per_batch'] for r in train) if train else float('nan')
    flags = records[0]['flags']
    model = f"{flags['model']} {flags['nhid']}x{flags['nlayers']}"
    return (f"| {label(records)} | {model} | {records[0]['processes']} | {len(epochs)} "
            f"| {min(r['valid_ppl'] for r in epochs):.2f} | {ends[-1]['test_ppl']:.2f} "
            f"| {statistics.mean(r['epoch_seconds'] for r in epochs):.0f} | {ms:.1f} | {ends[-1]['skipped']} |")


def main(argv=None):
    p = cli.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument('metrics', nargs='+', help='SAVE.metrics.jsonl files of finished runs')
    args = p.parse_args(argv)
    print('| recipe | model | processes | epochs | valid ppl | test ppl | s/epoch | ms/batch | skipped |')
    print('| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |')
    for path in args.metrics:
        print(row(path))
    return 0


if __name__ == '__main__':
    sys.exit(cli.guarded_main(main, prog=PROG))
