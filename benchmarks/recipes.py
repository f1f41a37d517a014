"""Time one training step (and the evaluation pass) of every precision recipe.

Run from the repository root:

    python3 -m benchmarks.recipes               # apex's model: LSTM 1504/1504, batch 24, bptt 35, vocab 33,280
    python3 -m benchmarks.recipes --small       # LSTM 200/200, batch 20
    python3 -m benchmarks.recipes --cuda --json benchmarks/results/h100.json
    python3 -m benchmarks.recipes --small --model Transformer --nhead 2   # the causal Transformer

Each recipe builds a fresh model with the same seed and runs the same training
step code as the scripts (training.train_batch with the recipe's update step):
warm-up steps first, then --steps timed steps, the device synchronised before
and after. On the CPU each recipe runs in its own process so that its peak
memory (max RSS, which includes the imported libraries) is its own; on CUDA peak
memory is torch.cuda.max_memory_allocated. With --rounds N every recipe runs N
times, in turn (in reverse order every other round), and the fastest run of each is kept.
"""
import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time

import torch

import data
import recipes
import training
from benchmarks import cpu_model, kernels
from main import ManualFP16Recipe
from main_fp16_optimizer import FP16OptimizerRecipe
from model import MODEL_TYPES, build_model, repackage_hidden
from plumbing import cli, cpu_fp16_matmul
from plumbing.errors import UsageError

PROG = 'python3 -m benchmarks.recipes'
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Benchmark name -> recipe(model, cfg). Each name is the recipe's .name, except two:
# 'fp32-classic' (None), the reference, is the step written the classic way (model.zero_grad,
# clip, p.data.add_ in a Python loop); 'fp32-tf32' is the fp32 recipe with TF32 allowed on CUDA.
RECIPES = {
    'fp32-classic': None,
    'fp32': lambda model, cfg: recipes.AutocastRecipe(model, cfg.lr, cfg.clip),
    'fp32-tf32': lambda model, cfg: recipes.AutocastRecipe(model, cfg.lr, cfg.clip),
    'fp16-manual': lambda model, cfg: ManualFP16Recipe(model, cfg.lr, cfg.clip, cfg.static_loss_scale),
    'fp16-optimizer-static': lambda model, cfg: FP16OptimizerRecipe(model, cfg.lr, cfg.clip, cfg.static_loss_scale),
    'fp16-optimizer-dynamic': lambda model, cfg: FP16OptimizerRecipe(model, cfg.lr, cfg.clip, cfg.static_loss_scale,
                                                                     dynamic_loss_scale=True),
    'amp': lambda model, cfg: recipes.AutocastRecipe(model, cfg.lr, cfg.clip, torch.float16),
    'bf16': lambda model, cfg: recipes.AutocastRecipe(model, cfg.lr, cfg.clip, torch.bfloat16),
}
MATH = {'fp32-classic': 'fp32', 'fp32': 'fp32', 'fp32-tf32': 'tf32', 'amp': 'fp16', 'bf16': 'bf16',
        'fp16-manual': 'fp16', 'fp16-optimizer-static': 'fp16', 'fp16-optimizer-dynamic': 'fp16'}
LOW = {'fp16': torch.float16, 'bf16': torch.bfloat16}
# Dense peak TFLOP/s from NVIDIA's datasheets (without sparsity), matched on the device name.
PEAK_TFLOPS = {
    'H100 PCIe': {'fp16': 756, 'bf16': 756, 'tf32': 378, 'fp32': 51},
    'H100': {'fp16': 989, 'bf16': 989, 'tf32': 494, 'fp32': 67},
    'H200': {'fp16': 989, 'bf16': 989, 'tf32': 494, 'fp32': 67},
    'A100': {'fp16': 312, 'bf16': 312, 'tf32': 156, 'fp32': 19.5},
}
GATES = {'LSTM': 4, 'GRU': 3, 'RNN_TANH': 1, 'RNN_RELU': 1}


def step_flops(cfg):
    """Matmul FLOPs of one forward pass: the RNN's input and recurrent GEMMs, and the decoder; for the
    Transformer, each layer's projections (q, k, v, out: 4 emsize^2), attention scores and weighted sums
    (over all bptt positions; the causal mask skips about half), and feed-forward (2 emsize * nhid)."""
    tokens = cfg.bptt * cfg.batch_size
    if cfg.model == 'Transformer':
        per_token = 4 * cfg.emsize ** 2 + 2 * cfg.bptt * cfg.emsize + 2 * cfg.emsize * cfg.nhid
        return 2 * tokens * per_token * cfg.nlayers + 2 * tokens * cfg.emsize * cfg.ntokens
    rnn = sum(2 * tokens * ((cfg.emsize if layer == 0 else cfg.nhid) + cfg.nhid) * GATES[cfg.model] * cfg.nhid
              for layer in range(cfg.nlayers))
    return rnn + 2 * tokens * cfg.nhid * cfg.ntokens


def peak_tflops(device_name, math):
    for key, peaks in PEAK_TFLOPS.items():
        if key in device_name:
            return peaks[math]
    return None


def sync(device):
    if device.type != 'cpu':
        torch.accelerator.synchronize(device)


def classic_step(model, cfg):
    """The fp32 step as the classic example wrote it."""
    def step(inputs, targets, hidden):
        hidden = repackage_hidden(hidden)
        model.zero_grad()
        output, hidden = model(inputs, hidden)
        loss = torch.nn.functional.cross_entropy(output.view(-1, cfg.ntokens), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-cfg.lr)
        return loss.detach(), hidden, True
    return step


def profile_steps(name, step, train_data, hidden, cfg, device, steps=3):
    """Print where a few steps spend their time, how many host syncs (.item()) they make, and in which
    precision the matrix products ran (benchmarks/kernels.py); return the last."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == 'cuda':
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        for n in range(steps):
            inputs, targets = data.get_batch(train_data, n * cfg.bptt, cfg.bptt)
            _, hidden, _ = step(inputs, targets, hidden)
        sync(device)
    events = prof.key_averages()
    syncs = sum(e.count for e in events if e.key == 'aten::_local_scalar_dense') / steps
    sort = 'self_device_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    print(f'| profile of {name}, {steps} steps, {syncs:g} host syncs (.item()) per step', flush=True)
    print(events.table(sort_by=sort, row_limit=12, max_name_column_width=60), flush=True)
    dtypes = kernels.matmul_dtypes(prof, cfg.ntokens, 'transformer' if cfg.model == 'Transformer' else 'rnn')
    print(f'| matrix products of {name}: {kernels.describe(dtypes)}', flush=True)
    return dtypes


def measure(name, cfg, device, tokens):
    """Time cfg.steps training steps of recipe `name` after cfg.warmup, then the evaluation pass."""
    if device.type == 'cuda':
        tf32 = name == 'fp32-tf32'
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    elif MATH[name] in ('fp16', 'bf16') and cpu_fp16_matmul.is_emulated(LOW[MATH[name]], device):
        # As the scripts do on this CPU (each recipe has its own process).
        cpu_fp16_matmul.use_fp32_products(LOW[MATH[name]])
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.ntokens, cfg.emsize, cfg.nhid, cfg.nlayers, cfg.dropout, nhead=cfg.nhead)
    model.to(device)
    if RECIPES[name] is None:
        recipe, step = None, classic_step(model, cfg)
    else:
        recipe = RECIPES[name](model, cfg)
        def step(inputs, targets, hidden):
            return training.train_batch(model, recipe, inputs, targets, hidden)
    train_data = data.batchify(tokens, cfg.batch_size).to(device)
    nbatch = (train_data.size(0) - 1) // cfg.bptt
    model.train()
    hidden = model.init_hidden(cfg.batch_size)
    skipped = 0  # updates skipped for non-finite gradients, warm-up steps included
    for n in range(cfg.warmup + cfg.steps):
        if n == cfg.warmup:
            sync(device)
            start = time.perf_counter()
        inputs, targets = data.get_batch(train_data, (n % nbatch) * cfg.bptt, cfg.bptt)
        loss, hidden, updated = step(inputs, targets, hidden)
        skipped += not updated
    sync(device)
    elapsed = time.perf_counter() - start
    matmul_dtypes = profile_steps(name, step, train_data, hidden, cfg, device) if cfg.profile else None
    scale = recipe.loss_scale if recipe else None
    # Evaluation: forward only, eval batch size, the recipe's precision.
    eval_data = data.batchify(tokens[:(cfg.steps * cfg.bptt + 1) * training.EVAL_BATCH_SIZE],
                              training.EVAL_BATCH_SIZE).to(device)
    autocast = recipe.autocast if recipe else contextlib.nullcontext
    training.evaluate(model, eval_data[:cfg.bptt + 1], cfg.bptt, autocast)  # warm-up
    sync(device)
    eval_start = time.perf_counter()
    training.evaluate(model, eval_data, cfg.bptt, autocast)
    eval_elapsed = time.perf_counter() - eval_start
    eval_batches = (eval_data.size(0) - 1 + cfg.bptt - 1) // cfg.bptt
    if device.type == 'cuda':
        peak_memory, memory_kind = torch.cuda.max_memory_allocated(device), 'cuda max allocated'
    else:
        peak_memory, memory_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 'cpu max rss'
    flops = 3 * step_flops(cfg)  # backward costs about twice the forward
    achieved = flops * cfg.steps / elapsed / 1e12
    device_name = torch.cuda.get_device_name(device) if device.type == 'cuda' else device.type
    peak = peak_tflops(device_name, MATH[name])
    return {
        'recipe': name, 'ms_per_step': 1000 * elapsed / cfg.steps,
        'tokens_per_s': cfg.steps * cfg.bptt * cfg.batch_size / elapsed,
        'peak_memory_bytes': peak_memory, 'memory_kind': memory_kind,
        'achieved_tflops': achieved, 'math': MATH[name], 'peak_tflops': peak,
        'fraction_of_peak': achieved / peak if peak else None,
        'eval_ms_per_batch': 1000 * eval_elapsed / eval_batches,
        'eval_tokens_per_s': (eval_data.size(0) - 1) * training.EVAL_BATCH_SIZE / eval_elapsed,
        'skipped_steps': skipped, 'final_loss_scale': scale, 'last_loss': loss.item(),
        'matmul_dtypes': matmul_dtypes,
    }


def token_stream(cfg):
    needed = (max(cfg.steps, 2) * cfg.bptt + 1) * max(cfg.batch_size, training.EVAL_BATCH_SIZE) * 2
    if cfg.data:
        tokens = data.Corpus(cfg.data, pad_to_multiple_of=8).train
        return tokens[:needed].clone() if len(tokens) >= needed else tokens.repeat(needed // len(tokens) + 1)[:needed]
    return torch.randint(cfg.ntokens, (needed,), generator=torch.Generator().manual_seed(cfg.seed))


def print_table(report):
    print(f'\n{report["device"]} | torch {report["torch"]} | {report["config"]}')
    print(f'{"recipe":24s} {"ms/step":>9s} {"tokens/s":>10s} {"x fp32":>7s} {"peak MiB":>9s} '
          f'{"TFLOP/s":>8s} {"of peak":>8s} {"eval ms":>8s} {"skipped":>8s}')
    for r in report['results']:
        frac = f'{100 * r["fraction_of_peak"]:7.1f}%' if r['fraction_of_peak'] is not None else f'{"-":>8s}'
        print(f'{r["recipe"]:24s} {r["ms_per_step"]:9.2f} {r["tokens_per_s"]:10.0f} {r["ratio_to_fp32"]:7.2f} '
              f'{r["peak_memory_bytes"] / 2**20:9.0f} {r["achieved_tflops"]:8.2f} {frac} '
              f'{r["eval_ms_per_batch"]:8.2f} {r["skipped_steps"]:8d}')


def parse_args(argv):
    p = cli.ArgumentParser(prog=PROG, description='Time the training step of every precision recipe.')
    p.add_argument('--small', action='store_true', help="LSTM 200/200, batch 20 instead of apex's 1504/1504, 24")
    p.add_argument('--smoke', action='store_true', help='tiny model, 2 steps: checks that every recipe runs')
    p.add_argument('--model', default='LSTM', help=', '.join(MODEL_TYPES))
    p.add_argument('--nhead', type=int, default=2, help='attention heads of --model Transformer')
    p.add_argument('--emsize', type=int)
    p.add_argument('--nhid', type=int)
    p.add_argument('--nlayers', type=int, default=2)
    p.add_argument('--batch_size', type=int)
    p.add_argument('--bptt', type=int, default=35)
    p.add_argument('--ntokens', type=int, default=33280, help='vocabulary size (synthetic tokens)')
    p.add_argument('--data', help='time on the train tokens of this corpus instead of synthetic ones')
    p.add_argument('--steps', type=int, default=20, help='timed steps')
    p.add_argument('--warmup', type=int, default=5, help='untimed steps first')
    p.add_argument('--rounds', type=int, default=1,
                   help='run every recipe this many times, in turn, and keep the fastest (for noisy machines)')
    p.add_argument('--recipes', default=None, help=f'comma-separated subset of {",".join(RECIPES)}')
    p.add_argument('--json', default=None, help='write the results here')
    p.add_argument('--profile', action='store_true', help='also print a profile of 3 steps of each recipe')
    p.add_argument('--in-process', action='store_true',
                   help='on the CPU, run every recipe in this process (quicker; peak memory is then the largest so far)')
    p.add_argument('--one', help=argparse.SUPPRESS)  # run one recipe in this process, print its JSON
    cli.add_device_flags(p)
    cfg = p.parse_args(argv)
    size = (16, 16, 4) if cfg.smoke else (200, 200, 20) if cfg.small else (1504, 1504, 24)
    cfg.emsize = cfg.emsize or size[0]
    cfg.nhid = cfg.nhid or size[1]
    cfg.batch_size = cfg.batch_size or size[2]
    if cfg.smoke:
        cfg.ntokens, cfg.bptt, cfg.steps, cfg.warmup = 64, 5, 2, 1
    cfg.dropout, cfg.lr, cfg.clip, cfg.static_loss_scale, cfg.seed = 0.65, 20.0, 0.25, 128.0, 1111
    check_args(cfg)
    return cfg


def check_args(cfg):
    """Flag values the benchmark cannot run with (UsageError: one sentence, exit code 2)."""
    cli.check_at_least_1(cfg, ('--emsize', '--nhid', '--nlayers', '--nhead', '--batch_size', '--bptt', '--ntokens',
                               '--steps', '--rounds'))
    if cfg.warmup < 0:
        raise UsageError(f'--warmup must not be negative (got {cfg.warmup}).')
    if cfg.model not in MODEL_TYPES:
        raise UsageError(f'--model {cfg.model} is not a known model type; choose one of {", ".join(MODEL_TYPES)}.')
    if cfg.model == 'Transformer':
        cli.check_transformer_args(cfg)
    if cfg.data is not None and not os.path.isdir(cfg.data):
        raise UsageError(f'--data {cfg.data}: no such directory.')
    if cfg.json:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.json)), exist_ok=True)
        cli.check_output_file('--json', cfg.json)
    names = cfg.recipes.split(',') if cfg.recipes else []
    unknown = [r for r in names if r not in RECIPES]
    if unknown:
        raise UsageError(f'unknown recipe(s) {", ".join(unknown)}; choose from {", ".join(RECIPES)}.')
    if cfg.one is not None and cfg.one not in RECIPES:
        raise UsageError(f'unknown recipe {cfg.one}.')


def run_in_own_process(name, argv):
    """measure(name) in a fresh Python, for its own max RSS: `python3 -m benchmarks.recipes`
    with the same flags plus --one name, in the same directory (relative paths keep their
    meaning), with the repository root on PYTHONPATH (the package imports whatever that directory is)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get('PYTHONPATH')])))
    return subprocess.run([sys.executable, '-m', 'benchmarks.recipes', *argv, '--json', '', '--one', name],
                          capture_output=True, text=True, env=env)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(argv)
    device = cli.select_device(cfg)
    tokens = token_stream(cfg)
    if cfg.data:
        cfg.ntokens = max(cfg.ntokens, int(tokens.max()) + 1)
    if cfg.one:
        print(json.dumps(measure(cfg.one, cfg, device, tokens)))
        return 0
    names = cfg.recipes.split(',') if cfg.recipes else [r for r in RECIPES if r != 'fp32-tf32' or device.type == 'cuda']
    if device.type == 'cuda':
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f'cpu ({cpu_model()}, {os.cpu_count()} cores)'
    config = {k: getattr(cfg, k) for k in ('model', 'emsize', 'nhid', 'nlayers', 'batch_size', 'bptt', 'ntokens',
                                           'steps', 'warmup', 'rounds')}
    if cfg.model == 'Transformer':
        config['nhead'] = cfg.nhead
    config['tokens'] = 'real: ' + cfg.data if cfg.data else 'synthetic'
    report = {'device': device_name, 'torch': torch.__version__, 'config': config,
              'train_flops_per_step': 3 * step_flops(cfg), 'results': []}
    best = {}
    for round_ in range(1, cfg.rounds + 1):
        order = names if round_ % 2 else names[::-1]  # alternate, so no recipe always runs first
        for n, name in enumerate(order, 1):
            print(f'| round {round_}/{cfg.rounds} [{n}/{len(names)}] {name}: '
                  f'{cfg.warmup} warm-up + {cfg.steps} timed steps ...', flush=True)
            if device.type == 'cpu' and not cfg.in_process:  # own process, own max RSS
                out = run_in_own_process(name, argv)
                if out.returncode:
                    sys.stderr.write(out.stderr)
                    return cli.report_error(f'{name} failed in its own process (exit code {out.returncode}).', 1, PROG)
                *profile_lines, last = out.stdout.strip().splitlines()
                print('\n'.join(profile_lines), end='\n' if profile_lines else '')
                result = json.loads(last)
            else:
                result = measure(name, cfg, device, tokens)
            print(f'|     {result["ms_per_step"]:.2f} ms/step, {result["tokens_per_s"]:.0f} tokens/s, '
                  f'eval {result["eval_ms_per_batch"]:.2f} ms/batch, skipped {result["skipped_steps"]}', flush=True)
            if name not in best or result['ms_per_step'] < best[name]['ms_per_step']:
                best[name] = result
    report['results'] = [best[r] for r in names]
    base = next((r for r in report['results'] if r['recipe'] == 'fp32'), report['results'][0])
    for r in report['results']:
        r['ratio_to_fp32'] = r['tokens_per_s'] / base['tokens_per_s']
    print_table(report)
    if cfg.json:
        with open(cfg.json, 'w') as f:
            json.dump(report, f, indent=1)
        print(f'| wrote {cfg.json}')
    return 0


if __name__ == '__main__':
    sys.exit(cli.guarded_main(main, prog=PROG))
