"""What every script does at the command line: flags and their checks, the device, and turning
the errors library code raises into one sentence and an exit code (guarded_main)."""
import argparse
import contextlib
import math
import os
import resource
import sys

import torch

from model import MODEL_TYPES, TransformerModel
from plumbing import checkpoint, distributed, onnx_export, wikitext
from plumbing.errors import ExampleError, UsageError, exception_chain
from plumbing.files import temp_name
from plumbing.signals import Interrupted, SignalExit, install_guards


def guarded_main(main, argv=None, prog=None):
    """Call main(argv) and return the exit code: what main returns, or an ExampleError's exit_code
    after its one-sentence error; 128 + the signal's number when a signal ends the run (see call_main).

    While main runs, output to a pipe or terminal that closes is discarded instead of ending
    the run (`main.py | head -3`), and SIGINT, SIGTERM or SIGHUP raise Interrupted until a
    StopRequest takes over.
    """
    restore = install_guards()
    try:
        return call_main(main, argv, prog)
    except ExampleError as e:
        return report_error(e, e.exit_code, prog)
    finally:
        restore()


def report_error(error, code, prog=None):
    """Print 'PROG: error: ERROR' (PROG: the script's file name by default) and return code."""
    print(f'{prog or os.path.basename(sys.argv[0])}: error: {error}', file=sys.stderr, flush=True)
    return code


def call_main(main, argv, prog):
    """main(argv) or 0; 128 + signum if a SignalExit ended it, with a sentence for Interrupted.

    The SignalExit is looked for in the whole chain of the exception: C++ code that calls back into
    Python (torch.save's writer) raises a RuntimeError of its own during it, and our code may turn
    that into a worded error.
    """
    try:
        return main(argv) or 0
    except BaseException as e:
        # Under torchrun, a rank that died shows in the others as an error of the collective (perhaps in a
        # backward pass), and torchrun's SIGTERM may land while that error unwinds: the lost contact is the news.
        lost = next((x for x in exception_chain(e) if distributed.is_lost_contact(x)), None)
        if lost is not None:
            return report_error(lost if isinstance(lost, distributed.DistributedError)
                                else distributed.lost_contact(lost), 1, prog)
        stopped = next((x for x in exception_chain(e) if isinstance(x, SignalExit)), None)
        if stopped is None and is_out_of_memory(e):
            return report_error('out of memory: the model, --batch_size and --bptt need more memory than this '
                                "process may use (the machine's RAM, ulimit -v, the cgroup or the GPU); try smaller "
                                'ones.', 1, prog)
        if stopped is None:
            raise
        if isinstance(stopped, Interrupted):
            return report_error(f'interrupted by {stopped} before anything was saved.', 128 + stopped.signum, prog)
        return 128 + stopped.signum  # SecondSignal: its handler has said so


def is_out_of_memory(error):
    """Whether error is an allocation that failed: Python's, torch's on the CPU (a RuntimeError) or on a GPU."""
    return any(isinstance(x, (MemoryError, torch.OutOfMemoryError))
               or isinstance(x, RuntimeError) and "can't allocate memory" in str(x) for x in exception_chain(error))


# ---------------------------------------------------------------- training flags

class ArgumentParser(argparse.ArgumentParser):
    """argparse with every default shown in --help, and a bad flag as one line ('PROG: error: ...', exit 2)
    instead of the usage block, which -h shows."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)

    def error(self, message):
        raise UsageError(f'{message}; see {self.prog} -h.')


# The model and schedule --size names; flags given on the command line keep their own values.
SIZES = {
    'apex': {},
    'cpu': {'emsize': 128, 'nhid': 128, 'dropout': 0.2, 'batch_size': 32, 'epochs': 6},
}


def training_parser(description):
    p = ArgumentParser(description=description)
    p.add_argument('--data', type=str, default=wikitext.DEFAULT_DATA,
                   help='directory holding train.txt, valid.txt and test.txt; '
                        'WikiText-2 is downloaded there if it is the default and missing')
    p.add_argument('--model', type=str, default='LSTM', help=f'model type: {", ".join(MODEL_TYPES)}')
    p.add_argument('--size', choices=('apex', 'cpu', 'auto'), default='apex',
                   help="apex's model and schedule (the defaults below); cpu: --emsize 128 --nhid 128 --dropout 0.2 "
                        '--batch_size 32 --epochs 6; auto: apex on an accelerator, else cpu')
    p.add_argument('--emsize', type=int, default=1504, help='word embedding width')
    p.add_argument('--nhid', type=int, default=1504, help='hidden state width of each RNN layer')
    p.add_argument('--nlayers', type=int, default=2, help='how many RNN layers are stacked')
    p.add_argument('--lr', type=float, default=20, help='learning rate to start from (divided by 4 whenever validation stops improving)')
    p.add_argument('--clip', type=float, default=0.25, help='clip the total gradient norm to this value')
    p.add_argument('--epochs', type=int, default=40, help='how many epochs to train at most')
    p.add_argument('--batch_size', type=int, default=24, metavar='N', help='columns the training text is cut into (the batch dimension)')
    p.add_argument('--bptt', type=int, default=35, help='steps of truncated backpropagation through time per batch')
    p.add_argument('--dropout', type=float, default=0.65, help='dropout probability after the embedding, between layers and before the decoder')
    p.add_argument('--tied', action='store_true', help='share one matrix between the embedding and the decoder (an RNN needs emsize == nhid)')
    p.add_argument('--seed', type=int, default=1111, help='seed for torch\'s random number generators')
    add_device_flags(p)
    p.add_argument('--log-interval', type=int, default=200, metavar='N', help='print a progress line every N batches')
    p.add_argument('--save', type=str, default='model.pt', help='where the best model (by validation loss) is written')
    precision = p.add_mutually_exclusive_group()
    precision.add_argument('--fp16', action='store_true',
                           help='train an fp16 model with fp32 master weights and a loss scale')
    precision.add_argument('--amp', action='store_true',
                           help='fp32 weights, forward under torch.autocast(float16), torch.amp.GradScaler')
    precision.add_argument('--bf16', action='store_true',
                           help='fp32 weights, forward under torch.autocast(bfloat16), no loss scaling')
    p.add_argument('--static-loss-scale', type=float, default=None,
                   help='static loss scale for --fp16 (unset: 128 with --fp16, else 1); '
                        'powers of 2 keep the scaling exact')
    p.add_argument('--resume', type=str, default=None, metavar='CHECKPOINT',
                   help='continue the run saved in CHECKPOINT (SAVE.resume, written after every epoch and on Ctrl-C), '
                        'with the flags saved there')
    p.add_argument('--nhead', type=int, default=2, help='attention heads in each layer of --model Transformer')
    p.add_argument('--use-optimizer', action='store_true', help='update with AdamW (lr as given) instead of plain SGD')
    p.add_argument('--dry-run', action='store_true',
                   help='one batch of training and of evaluation per epoch, to check the code and the model quickly; '
                        'writes --save and SAVE.metrics.jsonl, no SAVE.resume')
    p.add_argument('--onnx-export', type=str, default='', metavar='PATH',
                   help='after training, export the best model to ONNX at PATH (fp32; needs requirements-onnx.txt)')
    return p


def parse_training_args(parser, argv):
    """The flags of a training script, checked: those argv gives; with --resume, the others from the flags saved
    in the resume file (a resumed run continues the saved one); else with --size, the size's values; else defaults."""
    defaults = vars(parser.parse_args([]))
    given = vars(parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(defaults, NOT_GIVEN))))
    if given['resume'] is not NOT_GIVEN:
        fallback = {**defaults, **saved_flags(given['resume'], defaults)}
    else:
        fallback = {**defaults, **SIZES[size_for(given, defaults)]}
    args = argparse.Namespace(**{dest: fallback[dest] if value is NOT_GIVEN else value for dest, value in given.items()})
    check_training_args(args)
    return args


# What parse_training_args marks a flag that argv does not give with.
NOT_GIVEN = object()


def saved_flags(resume, known):
    """The flags saved in the resume file that this script knows, --resume itself aside."""
    if not os.path.isfile(resume):
        raise UsageError(f'--resume {resume}: no such file.')
    saved = checkpoint.load_resume_flags(resume)
    return {dest: value for dest, value in saved.items() if dest in known and dest != 'resume'}


def size_for(given, defaults):
    """The --size that applies: 'auto' is apex's on an accelerator (--cuda, or --accel that finds one), else cpu."""
    size = defaults['size'] if given['size'] is NOT_GIVEN else given['size']
    if size != 'auto':
        return size
    on_cuda = given['cuda'] is True and torch.cuda.is_available()
    on_accelerator = given['accel'] is True and torch.accelerator.is_available()
    return 'apex' if on_cuda or on_accelerator else 'cpu'


# Flags that must hold positive integers, as the user types them.
POSITIVE_FLAGS = ('--emsize', '--nhid', '--nlayers', '--epochs', '--batch_size', '--bptt', '--log-interval', '--nhead')


def check_at_least_1(args, flags):
    """Each of flags (as typed: '--log-interval') must be 1 or more in args, unless it was left unset (None)."""
    for flag in flags:
        value = getattr(args, flag.lstrip('-').replace('-', '_'))
        if value is not None and value < 1:
            raise UsageError(f'{flag} must be at least 1 (got {value}).')



def check_training_args(args):
    """Reject bad flag values and unusable paths before anything is loaded or trained; settle the loss scale."""
    check_at_least_1(args, POSITIVE_FLAGS)
    if not 0 <= args.dropout < 1:
        raise UsageError(f'--dropout must be in [0, 1) (got {args.dropout:g}).')
    for flag, value in (('--lr', args.lr), ('--clip', args.clip), ('--static-loss-scale', args.static_loss_scale)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise UsageError(f'{flag} must be a positive number (got {value:g}).')
    if args.model not in MODEL_TYPES:
        raise UsageError(f"--model {args.model} is not a known model type; choose one of {', '.join(MODEL_TYPES)}.")
    if args.model == 'Transformer':
        check_transformer_args(args)
    elif args.tied and args.emsize != args.nhid:
        raise UsageError(f'--tied needs --emsize equal to --nhid (got emsize {args.emsize}, nhid {args.nhid}).')
    if not uses_default_data(args.data) and not os.path.isdir(args.data):
        raise UsageError(f'--data {args.data}: no such directory.')
    check_seed(args.seed)
    data_files = [('--data', os.path.join(args.data, f'{split}.txt')) for split in wikitext.SPLITS]
    check_output_file('--save', args.save, data_files)
    check_output_file('SAVE.resume', args.save + '.resume', data_files)
    check_output_file('SAVE.metrics.jsonl', args.save + '.metrics.jsonl', data_files)
    if args.resume is not None:
        check_input_file('--resume', args.resume)
    if args.onnx_export:
        check_onnx_export(args, data_files)
    if args.static_loss_scale is None:
        args.static_loss_scale = 128.0 if args.fp16 else 1.0
    elif not args.fp16 and args.static_loss_scale != 1.0:
        print('Warning:  static_loss_scale != 1.0 is only necessary with --fp16. '
              'Resetting static_loss_scale to 1.0')
        args.static_loss_scale = 1.0
    if args.fp16 and math.frexp(args.static_loss_scale)[0] != 0.5:
        print(f'Warning: --static-loss-scale {args.static_loss_scale:g} is not a power of 2, so scaling the loss and '
              'unscaling the gradients round them; a power of 2 keeps both exact.')


def check_transformer_args(args):
    """Each attention head takes emsize / nhead dimensions; the positional encoding holds MAX_LEN positions."""
    if args.emsize % args.nhead:
        raise UsageError(f'--emsize {args.emsize} must be a multiple of --nhead {args.nhead} with --model Transformer.')
    if args.bptt > TransformerModel.MAX_LEN:
        raise UsageError(f'--bptt must be at most {TransformerModel.MAX_LEN} with --model Transformer (got {args.bptt}).')


def check_positions(model, bptt, source):
    """A Transformer reads at most MAX_LEN positions at once (source: where bptt came from, '--bptt')."""
    if model.rnn_type == 'Transformer' and bptt > TransformerModel.MAX_LEN:
        raise UsageError(f'bptt {bptt} ({source}) must be at most {TransformerModel.MAX_LEN} for a Transformer, '
                         'which reads at most that many positions at once.')


def check_onnx_export(args, data_files):
    """--onnx-export is written after training: its packages and its path are checked before it starts."""
    missing = onnx_export.missing_packages()
    if missing:
        raise UsageError(f"--onnx-export needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                         f'not installed: pip install -r requirements-onnx.txt installs them.')
    run_files = [('--save', args.save), ('SAVE.resume', args.save + '.resume')]
    if args.resume is not None:
        run_files.append(('--resume', args.resume))
    check_output_file('--onnx-export', args.onnx_export, data_files + run_files)


def require_matplotlib(what):
    """Drawing needs matplotlib, an optional dependency."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(f'{what} needs matplotlib, which is not installed: pip install -r requirements-plot.txt') from None


def uses_default_data(path):
    """The default data directory, which is downloaded into when its files are missing."""
    return os.path.normpath(path) == os.path.normpath(wikitext.DEFAULT_DATA)


def check_output_file(flag, path, inputs=()):
    """A file a script will write: a regular file or a new name, in a writable directory, and
    none of the run's inputs (inputs: (flag, path) pairs, compared as files, not as strings)."""
    if not path:
        raise UsageError(f'{flag} must name a file.')
    if os.path.isdir(path):
        raise UsageError(f'{flag} {path} is a directory; give a file name.')
    if os.path.islink(path):
        raise UsageError(f'{flag} {path} is a symbolic link; give the path of a regular file.')
    if os.path.exists(path) and not os.path.isfile(path):
        raise UsageError(f'{flag} {path} is not a regular file (a device, FIFO or socket); give a file name.')
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsageError(f'{flag} {path}: directory {directory} does not exist.')
    if not os.access(directory, os.W_OK):
        raise UsageError(f'{flag} {path}: directory {directory} is not writable.')
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f'{flag} {path} is not writable (read-only or immutable); make it writable or give another name.')
    # atomic_write writes a temporary name first (the pid at most 2**22): the file system must take it too.
    name_bytes = len(os.fsencode(os.path.basename(path)))
    longest = len(os.fsencode(temp_name(os.path.basename(path), 2 ** 22, 'x' * 8)))
    name_max = os.pathconf(directory, 'PC_NAME_MAX')
    if longest > name_max:
        raise UsageError(f'{flag} {path}: the name is too long for the file system (at most '
                         f'{name_max - longest + name_bytes} bytes here).')
    for input_flag, input_path in inputs:
        same_name = os.path.abspath(path) == os.path.abspath(input_path)  # also for files not written yet
        if same_name or os.path.exists(path) and os.path.exists(input_path) and os.path.samefile(path, input_path):
            raise UsageError(f'{flag} {path} is the same file as {input_flag} {input_path}; writing it would destroy it.')


def check_input_file(flag, path):
    """A file a script reads (flag '' for a positional argument): it must exist and be a regular file (a directory
    or a FIFO is named as one)."""
    name = f'{flag} {path}' if flag else path
    if os.path.isdir(path):
        raise UsageError(f'{name} is a directory; give a file.')
    if os.path.exists(path) and not os.path.isfile(path):
        raise UsageError(f'{name} is not a regular file (a device, FIFO or socket); give a file.')
    if not os.path.isfile(path):
        raise UsageError(f'{name}: no such file.')


def check_checkpoint_file(path):
    """--checkpoint is an input file. Where it is missing but the SAVE.resume of a stopped run lies beside it, say so."""
    resume = path + '.resume'
    if not os.path.lexists(path) and os.path.isfile(resume):
        raise UsageError(f'--checkpoint {path}: no such file, but {resume} is: the run that writes {path} was '
                         f'stopped before an epoch ended, and {resume} holds its latest weights; give --checkpoint '
                         f'{resume} to use them.')
    check_input_file('--checkpoint', path)


def check_seed(seed):
    """torch's generators take seeds from -2**63 to 2**64 - 1."""
    if not -2 ** 63 <= seed < 2 ** 64:
        raise UsageError(f'--seed must be between -2**63 and 2**64 - 1 (got {seed}).')


def check_model_size(args, ntokens, device):
    """Refuse a model whose fp32 weights alone would not fit in the device's memory, before it is built."""
    model_args = dict(rnn_type=args.model, ntoken=ntokens, ninp=args.emsize, nhid=args.nhid, nlayers=args.nlayers,
                      dropout=args.dropout, tie_weights=args.tied, **({'nhead': args.nhead}
                                                                     if args.model == 'Transformer' else {}))
    try:
        shapes = checkpoint.weight_shapes(model_args)
        tied = model_args['ntoken'] * model_args['ninp'] if args.tied else 0
        nbytes = 4 * (sum(math.prod(shape) for shape in shapes.values()) - tied)
    except (RuntimeError, OverflowError, ValueError):
        nbytes = math.inf
    if device.type == 'cuda':
        memory, what = torch.cuda.mem_get_info(device)[1], str(device)
    else:
        memory, what = cpu_memory_limit()
    if nbytes > memory:
        raise UsageError(f'--emsize {args.emsize}, --nhid {args.nhid} and --nlayers {args.nlayers} make a model whose '
                         f'weights need {nbytes / 2 ** 30:.3g} GiB, more than the {memory / 2 ** 30:.3g} GiB '
                         f'of {what}.')


def cpu_memory_limit():
    """(bytes, what they are): the smallest of the machine's RAM and the limits that apply to this process
    (ulimit -v and -d, the cgroup's memory.max)."""
    limits = [(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'), 'cpu')]
    for name, ulimit in (('RLIMIT_AS', 'ulimit -v'), ('RLIMIT_DATA', 'ulimit -d')):
        soft = resource.getrlimit(getattr(resource, name))[0]
        if soft != resource.RLIM_INFINITY:
            limits.append((soft, f'this process ({ulimit})'))
    for path in cgroup_memory_files():
        with contextlib.suppress(OSError, ValueError):
            with open(path) as f:
                limits.append((int(f.read().strip()), f'this process\'s cgroup ({path})'))  # 'max': no limit
    return min(limits)


def cgroup_memory_files():
    """The memory limit files of this process's cgroup: v2's memory.max, or v1's memory.limit_in_bytes."""
    try:
        with open('/proc/self/cgroup') as f:
            entries = [line.rstrip('\n').split(':', 2) for line in f]
    except OSError:
        return []
    files = []
    for _, controllers, group in (e for e in entries if len(e) == 3):
        if controllers == '':
            files.append(f'/sys/fs/cgroup{group.rstrip("/")}/memory.max')
        elif 'memory' in controllers.split(','):
            files.append(f'/sys/fs/cgroup/memory{group.rstrip("/")}/memory.limit_in_bytes')
    return files


# ---------------------------------------------------------------- device

def add_device_flags(parser):
    parser.add_argument('--cuda', action='store_true', help='run on the CUDA device')
    parser.add_argument('--accel', action='store_true',
                        help='use the accelerator torch.accelerator finds (CUDA, MPS, XPU, ...), or the CPU if none')


def select_device(args, world=None):
    """The device the flags ask for (under torchrun, the GPU of world's local rank): --cuda without a
    CUDA device is an error, --accel without an accelerator runs on the CPU."""
    if args.cuda:
        if not torch.cuda.is_available():
            raise UsageError('--cuda was given but no CUDA device is available.')
        return torch.device('cuda', world.local_rank) if world and not world.alone else torch.device('cuda')
    if args.accel:
        if not torch.accelerator.is_available():
            print('| --accel: torch.accelerator finds no accelerator (CUDA, MPS, XPU, ...), so this runs on the CPU',
                  flush=True)
            return torch.device('cpu')
        device = torch.accelerator.current_accelerator()
        return torch.device(device.type, world.local_rank) if world and not world.alone else device
    if torch.cuda.is_available():
        print('WARNING: You have a CUDA device, so you should probably run with --cuda')
    return torch.device('cpu')

