"""The checks benchmarks/gpu_check.sh (and claim_runs.sh) make of what the runs wrote; each prints one line
and exits 0 (ok) or 1 (FAIL). No torch import: each check takes a fraction of a second.

    python3 -m benchmarks.gpu_check same A.metrics.jsonl B.metrics.jsonl [--rtol 1e-3]
        the two runs recorded the same losses, perplexities, loss scales and skips (timings and
        the 'run' records aside): a resumed run against one never stopped, torchrun against one process
    python3 -m benchmarks.gpu_check metrics FILE...
        each metrics file holds a run record, progress lines, epochs and a finite test perplexity
    python3 -m benchmarks.gpu_check kernels BENCHMARK.json
        every recipe's matrix products ran in the precision the recipe promises (benchmarks.kernels)
    python3 -m benchmarks.gpu_check table FILE...
        the Results table rows of the README from finished runs' metrics files
"""
import argparse
import json
import math
import sys

# Fields that measure time, not arithmetic: they differ between any two runs.
TIMINGS = {'elapsed', 'ms_per_batch', 'tokens_per_s', 'epoch_seconds', 'eta'}


def read(path):
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()]


def difference(a, b):
    """The relative difference of two numbers; 0 or inf for anything else, equal or not."""
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    if not numbers:
        return 0.0 if a == b else math.inf
    if a == b or (math.isnan(a) and math.isnan(b)):
        return 0.0
    return abs(a - b) / max(abs(a), abs(b))


def same(path_a, path_b, rtol):
    """Whether two runs' records agree to rtol, and one line saying so or where they differ."""
    a, b = ([r for r in read(p) if r['kind'] != 'run'] for p in (path_a, path_b))
    if [r['kind'] for r in a] != [r['kind'] for r in b]:
        return False, f'the record kinds differ ({len(a)} records against {len(b)})'
    largest = 0.0
    for n, (ra, rb) in enumerate(zip(a, b)):
        for key in sorted((set(ra) | set(rb)) - TIMINGS):
            d = difference(ra.get(key), rb.get(key))
            if d > rtol:
                return False, f"record {n + 1} ({ra['kind']}): {key} {ra.get(key)!r} against {rb.get(key)!r}"
            largest = max(largest, d)
    if not a or a[-1]['kind'] != 'end':
        return False, 'no test record (kind end) at the end'
    return True, (f"{len(a)} records the same (largest relative difference {largest:.1e}, allowed {rtol:g}); "
                  f"test ppl {a[-1]['test_ppl']:.4f}")


def check_metrics(path):
    records = read(path)
    kinds = [r['kind'] for r in records]
    missing = [k for k in ('run', 'train', 'epoch', 'end') if k not in kinds]
    if missing:
        return False, f'{path}: no {", ".join(missing)} record'
    end = [r for r in records if r['kind'] == 'end'][-1]
    if not math.isfinite(end['test_ppl']):
        return False, f'{path}: test ppl {end["test_ppl"]}'
    return True, f'{path}: {len(records)} records, test ppl {end["test_ppl"]:.2f}'


# What each recipe promises, per part: the precisions its matrix products may run in, and one of
# them that must appear. The CPU's exceptions: oneDNN has no fp16 LSTM (plumbing/rnn_autocast.py).
EXPECTED = {
    'fp32-classic': ({'fp32'}, 'fp32'), 'fp32': ({'fp32'}, 'fp32'), 'fp32-tf32': ({'tf32', 'fp32'}, None),
    'fp16-manual': ({'fp16'}, 'fp16'), 'fp16-optimizer-static': ({'fp16'}, 'fp16'),
    'fp16-optimizer-dynamic': ({'fp16'}, 'fp16'), 'amp': ({'fp16'}, 'fp16'), 'bf16': ({'bf16'}, 'bf16'),
}


def allowed(recipe, part, device):
    ok, needed = EXPECTED[recipe]
    if recipe == 'bf16' and part != 'decoder':
        # bf16 where cuDNN has bf16 RNNs, else fp32 (TF32): never fp16.
        return ok | {'fp32', 'tf32'}, None
    if recipe == 'amp' and part == 'rnn' and device == 'cpu':
        return ok | {'fp32'}, None
    if device == 'cpu' and recipe == 'fp32-tf32':
        return {'fp32'}, 'fp32'
    return ok, needed


def check_kernels(path):
    report = json.load(open(path, encoding='utf-8'))
    device = 'cpu' if report['device'].startswith('cpu') else 'cuda'
    body = 'transformer' if report['config']['model'] == 'Transformer' else 'rnn'
    problems, lines = [], []
    for r in report['results']:
        dtypes = r.get('matmul_dtypes')
        if not dtypes:
            problems.append(f"{r['recipe']}: no profile (run with --profile)")
            continue
        for part in (body, 'decoder'):
            seen = set(dtypes.get(part, {}).get('dtypes', []))
            ok, needed = allowed(r['recipe'], part, device)
            if not seen:
                problems.append(f"{r['recipe']}: no matrix product of the {part} found")
            elif seen - ok or (needed and needed not in seen):
                problems.append(f"{r['recipe']}: the {part} ran in {'/'.join(sorted(seen))}, "
                                f"expected {'/'.join(sorted(ok))}")
        lines.append(f"{r['recipe']}: " + '; '.join(
            f"{part} {'/'.join(d['dtypes']) or '?'} ({', '.join(n for n, _, _ in d['top'][:2])})"
            for part, d in sorted(dtypes.items())))
    print('\n'.join(lines))
    if problems:
        return False, '; '.join(problems)
    return True, f'{len(report["results"])} recipes, each in its precision ({device})'


def table(paths):
    """Rows of the README's Results table from finished runs' metrics files: the command, loss scale,
    epochs, best valid ppl, test ppl, card and torch, and apex's figure where it gave one."""
    rows = []
    for path in paths:
        records = read(path)
        run = next(r for r in records if r['kind'] == 'run')
        epochs = [r for r in records if r['kind'] == 'epoch']
        ends = [r for r in records if r['kind'] == 'end']
        if not epochs or not ends or ends[-1].get('stopped'):
            rows.append(f'| {path}: not finished | | | | | | |')
            continue
        f = run['flags']
        flags = [flag for flag, on in (('--fp16', f.get('fp16')), ('--amp', f.get('amp')), ('--bf16', f.get('bf16')),
                                        ('--dynamic-loss-scale', f.get('dynamic_loss_scale'))) if on]
        if f.get('fp16') and not f.get('dynamic_loss_scale') and f['static_loss_scale'] != 128:
            flags.append(f"--static-loss-scale {f['static_loss_scale']:g}")
        command = f"`{run['script']}{''.join(' ' + x for x in flags)}`" + ('' if flags else ' (fp32)')
        scale = ('dynamic' if f.get('dynamic_loss_scale') else f"{f['static_loss_scale']:g}" if f.get('fp16')
                 else 'dynamic (GradScaler)' if f.get('amp') else '-')
        apex = {('main.py', '128'): '~90', ('main.py', '1'): '~93'}.get((run['script'], scale), '') \
            if run['recipe'] == 'fp16-manual' else ''
        rows.append(f"| {command} | {scale} | {len(epochs)} | {min(r['valid_ppl'] for r in epochs):.2f} | "
                    f"{ends[-1]['test_ppl']:.2f} | {run['device']}, torch {run['torch']} | {apex} |")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog='python3 -m benchmarks.gpu_check', description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest='command', required=True)
    s = sub.add_parser('same')
    s.add_argument('a')
    s.add_argument('b')
    s.add_argument('--rtol', type=float, default=0.0)
    sub.add_parser('metrics').add_argument('files', nargs='+')
    sub.add_parser('kernels').add_argument('benchmark')
    sub.add_parser('table').add_argument('files', nargs='+')
    args = p.parse_args(argv)
    try:
        if args.command == 'same':
            good, line = same(args.a, args.b, args.rtol)
        elif args.command == 'metrics':
            results = [check_metrics(f) for f in args.files]
            good = all(g for g, _ in results)
            line = '; '.join(m for g, m in results if not g) if not good else f'{len(results)} metrics files whole'
        elif args.command == 'kernels':
            good, line = check_kernels(args.benchmark)
        else:
            print('\n'.join(table(args.files)))
            return 0
    except (OSError, ValueError, KeyError, StopIteration) as e:
        good, line = False, f'{type(e).__name__}: {e}'
    print(line)
    return 0 if good else 1


if __name__ == '__main__':
    sys.exit(main())
