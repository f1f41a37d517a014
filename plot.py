"""Draw the curves of training runs from their SAVE.metrics.jsonl files, one line per run:

    python3 plot.py fp32.pt.metrics.jsonl fp16.pt.metrics.jsonl --out curves.png

Three panels: train and valid perplexity against wall-clock minutes (which recipe gets
there first), the same against epochs (does it get as far per update), and the loss scale
against steps for the recipes that scale the loss. Needs matplotlib
(pip install -r requirements-plot.txt).
"""
import itertools
import os
import sys

from plumbing import cli
from plumbing.files import atomic_write
from plumbing.metrics import read_run


def label(records):
    """The recipe, with its loss scale where it has a fixed one: 'fp16-manual, scale 128'."""
    run = records[0]
    if run['recipe'] in ('fp16-manual', 'fp16-optimizer-static'):
        return f"{run['recipe']}, scale {run['flags']['static_loss_scale']:g}"
    return run['recipe']


def draw(runs, out):
    """runs: (label, records) pairs; a PNG with the three panels to out."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter
    plain = FuncFormatter(lambda value, _: f'{value:g}')  # 200, not 2 x 10^2
    # One legend below the panels, in 4 columns: the figure grows with it, however many runs there are.
    legend_rows = -(-len(runs) // 4)
    figure = Figure(figsize=(16, 4.8 + 0.22 * legend_rows), layout='constrained')
    by_time, by_epoch, scales = figure.subplots(1, 3)
    scaled = False
    for n, (color, (name, records)) in enumerate(zip(color_cycle(), runs)):
        per_epoch = records[0]['batches_per_epoch']
        train = [r for r in records if r['kind'] == 'train']
        valid = [r for r in records if r['kind'] == 'epoch']
        for ax, x_train, x_valid in (
                (by_time, [r['elapsed'] / 60 for r in train], [r['elapsed'] / 60 for r in valid]),
                (by_epoch, [r['epoch'] - 1 + r['batch'] / per_epoch for r in train], [r['epoch'] for r in valid])):
            ax.plot(x_train, [r['ppl'] for r in train], color=color, alpha=0.6, linewidth=1)
            ax.plot(x_valid, [r['valid_ppl'] for r in valid], 'o-', color=color, linewidth=2, label=name)
        steps = [(r['step'], r['loss_scale']) for r in train if r['loss_scale'] is not None]
        if steps:
            scaled = True
            # Dashes tell apart runs whose scales coincide (GradScaler and FP16_Optimizer's dynamic scale).
            scales.step(*zip(*steps), where='post', color=color, label=name, linestyle=('-', '--', ':', '-.')[n % 4])
    for ax, xlabel in ((by_time, 'wall-clock minutes'), (by_epoch, 'epochs')):
        ax.set(xlabel=xlabel, ylabel='perplexity (thin: train, dots: valid)', yscale='log')
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.grid(True, which='both', alpha=0.3)
    by_time.set_title('perplexity against time')
    by_epoch.set_title('perplexity against epochs')
    scales.set(title='loss scale', xlabel='step (batches trained)', yscale='log', ylabel='loss scale')
    if scaled:
        scales.set_yscale('log', base=2)
        scales.grid(True, alpha=0.3)
    else:
        scales.text(0.5, 0.5, 'no run scales its loss', ha='center', va='center', transform=scales.transAxes)
    figure.legend(*by_epoch.get_legend_handles_labels(), loc='outside lower center', ncols=4, fontsize='small')
    devices = sorted({records[0]['device'] for _, records in runs})
    figure.suptitle('; '.join(devices), fontsize='small')
    with atomic_write(out) as f:
        figure.savefig(f, format='png', dpi=110)


def color_cycle():
    """matplotlib's colours, over and over: every run is drawn, however many."""
    from matplotlib import rcParams
    return itertools.cycle(rcParams['axes.prop_cycle'].by_key()['color'])


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('metrics', nargs='+', help='SAVE.metrics.jsonl files, one per run')
    p.add_argument('--out', default='curves.png', help='the PNG to write (default curves.png)')
    args = p.parse_args(argv)
    cli.require_matplotlib('plot.py')
    cli.check_output_file('--out', args.out, [('a metrics file', path) for path in args.metrics])
    runs = [(label(records), records) for records in map(read_run, args.metrics)]  # all read before drawing
    names = [name for name, _ in runs]
    runs = [(f'{name} ({os.path.basename(path)})' if names.count(name) > 1 else name, records)
            for (name, records), path in zip(runs, args.metrics)]
    draw(runs, args.out)
    print(f'| wrote {args.out}: {len(runs)} run(s)')
    return 0


if __name__ == '__main__':
    sys.exit(cli.guarded_main(main))
