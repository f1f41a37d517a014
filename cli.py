"""What every script does at the command line: flags and their checks, the device, Ctrl-C,
and turning the errors library code raises into one sentence and an exit code."""
import argparse
import contextlib
import errno
import math
import os
import select
import signal
import sys

import torch

import checkpoint
import data
import distributed
import onnx_export
import recipes
from model import MODEL_TYPES, TransformerModel


class UsageError(Exception):
    """A flag or path on the command line that cannot work (exit code 2)."""


def run(main, argv=None, prog=None):
    """Call main(argv) and return the exit code: what main returns, 2 for a command line that
    cannot work, 1 for unusable files or a run that failed, each with its one-sentence error;
    128 + the signal's number when a signal ends the run (see call_main).

    While main runs, output to a pipe or terminal that closes is discarded instead of ending
    the run (`main.py | head -3`), and SIGINT, SIGTERM or SIGHUP raise Interrupted until a
    StopRequest takes over.
    """
    restore = install_guards()
    try:
        return call_main(main, argv, prog)
    except (UsageError, checkpoint.CannotResume, checkpoint.SaveInUse) as e:
        return report_error(e, 2, prog)
    except (data.DataError, checkpoint.CheckpointError, checkpoint.WriteError, recipes.TrainingDiverged,
            distributed.DistributedError) as e:
        return report_error(e, 1, prog)
    finally:
        restore()


def report_error(error, code, prog=None):
    """Print 'PROG: error: ERROR' (PROG: the script's file name by default) and return code."""
    print(f'{prog or os.path.basename(sys.argv[0])}: error: {error}', file=sys.stderr, flush=True)
    return code


# ---------------------------------------------------------------- training flags

def training_parser(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument('--data', type=str, default=data.DEFAULT_DATA,
                   help='directory holding train.txt, valid.txt and test.txt; '
                        'WikiText-2 is downloaded there if it is the default and missing')
    p.add_argument('--model', type=str, default='LSTM', help=f'model type: {", ".join(MODEL_TYPES)}')
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
                   help='static loss scale for --fp16 (default 128); powers of 2 keep the scaling exact')
    p.add_argument('--resume', type=str, default=None, metavar='CHECKPOINT',
                   help='continue the run saved in CHECKPOINT (SAVE.resume, written after every epoch and on Ctrl-C)')
    p.add_argument('--nhead', type=int, default=2, help='attention heads in each layer of --model Transformer')
    p.add_argument('--use-optimizer', action='store_true', help='update with AdamW (lr as given) instead of plain SGD')
    p.add_argument('--dry-run', action='store_true',
                   help='one batch of training and of evaluation per epoch, to check the code and the model quickly')
    p.add_argument('--onnx-export', type=str, default='', metavar='PATH',
                   help='after training, export the best model to ONNX at PATH (fp32; needs requirements-onnx.txt)')
    return p


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
    data_files = [('--data', os.path.join(args.data, f'{split}.txt')) for split in data.SPLITS]
    check_output_file('--save', args.save, data_files)
    check_output_file('SAVE.resume', args.save + '.resume', data_files)
    check_output_file('SAVE.metrics.jsonl', args.save + '.metrics.jsonl', data_files)
    if args.resume is not None and not os.path.isfile(args.resume):
        raise UsageError(f'--resume {args.resume}: no such file.')
    if args.onnx_export:
        check_onnx_export(args, data_files)
    if args.static_loss_scale is None:
        args.static_loss_scale = 128.0 if args.fp16 else 1.0
    elif not args.fp16 and args.static_loss_scale != 1.0:
        print('Warning:  static_loss_scale != 1.0 is only necessary with --fp16. '
              'Resetting static_loss_scale to 1.0')
        args.static_loss_scale = 1.0


def check_transformer_args(args):
    """Each attention head takes emsize / nhead dimensions; the positional encoding holds MAX_LEN positions."""
    if args.emsize % args.nhead:
        raise UsageError(f'--emsize {args.emsize} must be a multiple of --nhead {args.nhead} with --model Transformer.')
    if args.bptt > TransformerModel.MAX_LEN:
        raise UsageError(f'--bptt must be at most {TransformerModel.MAX_LEN} with --model Transformer (got {args.bptt}).')


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
    return os.path.normpath(path) == os.path.normpath(data.DEFAULT_DATA)


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
    longest = len(os.fsencode(checkpoint.temp_name(os.path.basename(path), 2 ** 22, 'x' * 8)))
    name_max = os.pathconf(directory, 'PC_NAME_MAX')
    if longest > name_max:
        raise UsageError(f'{flag} {path}: the name is too long for the file system (at most '
                         f'{name_max - longest + name_bytes} bytes here).')
    for input_flag, input_path in inputs:
        same_name = os.path.abspath(path) == os.path.abspath(input_path)  # also for files not written yet
        if same_name or os.path.exists(path) and os.path.exists(input_path) and os.path.samefile(path, input_path):
            raise UsageError(f'{flag} {path} is the same file as {input_flag} {input_path}; writing it would destroy it.')


def check_seed(seed):
    """torch's generators take seeds from -2**63 to 2**64 - 1."""
    if not -2 ** 63 <= seed < 2 ** 64:
        raise UsageError(f'--seed must be between -2**63 and 2**64 - 1 (got {seed}).')


def check_model_size(build_model, args, device):
    """Refuse a model whose fp32 weights alone would not fit in the device's memory, before build_model() builds it."""
    try:
        with torch.device('meta'):  # shapes only: nothing is allocated
            model = build_model()
        nbytes = 4 * sum(p.numel() for p in model.parameters())
    except (RuntimeError, OverflowError, ValueError):
        nbytes = math.inf
    if device.type == 'cuda':
        memory = torch.cuda.mem_get_info(device)[1]
    else:
        memory = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    if nbytes > memory:
        raise UsageError(f'--emsize {args.emsize}, --nhid {args.nhid} and --nlayers {args.nlayers} make a model whose '
                         f'weights need {nbytes / 2 ** 30:.3g} GiB, more than the {memory / 2 ** 30:.3g} GiB of {device}.')


# ---------------------------------------------------------------- device

def add_device_flags(parser):
    parser.add_argument('--cuda', action='store_true', help='run on the CUDA device')
    parser.add_argument('--accel', action='store_true',
                        help='use the accelerator torch.accelerator finds (CUDA, MPS, XPU, ...)')


def select_device(args, world=None):
    """The device the flags ask for (under torchrun, the GPU of world's local rank); asking for one
    that is missing is an error."""
    if args.cuda:
        if not torch.cuda.is_available():
            raise UsageError('--cuda was given but no CUDA device is available.')
        return torch.device('cuda', world.local_rank) if world and not world.alone else torch.device('cuda')
    if args.accel:
        if not torch.accelerator.is_available():
            raise UsageError('--accel was given but torch.accelerator finds no accelerator (CUDA, MPS, XPU, ...).')
        device = torch.accelerator.current_accelerator()
        return torch.device(device.type, world.local_rank) if world and not world.alone else device
    if torch.cuda.is_available():
        print('WARNING: You have a CUDA device, so you should probably run with --cuda')
    return torch.device('cpu')


# ---------------------------------------------------------------- signals and closed output

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # Ctrl-C, kill, a closed terminal


class SignalExit(BaseException):
    """A signal that ends the run with exit code 128 + signum, the shell's code for a killed process.

    A BaseException, like KeyboardInterrupt, so that `except Exception` in library code lets it pass.
    """

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Interrupted(SignalExit):
    """A stop signal while no StopRequest is active: while the data loads or the model is built."""


class SecondSignal(SignalExit):
    """A second stop signal: quit at once, wherever the handler lands."""


def install_guards():
    """Wrap sys.stdout and sys.stderr in OutputThatMayClose and make stop signals raise Interrupted;
    returns the function that undoes both. A stream that is None (its descriptor was closed when
    Python started, and print skips it) stays None."""
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (None if s is None else OutputThatMayClose(s) for s in streams)
    handlers = {s: signal.signal(s, raise_interrupted) for s in handled_signals()}

    def restore():
        for s, handler in handlers.items():
            signal.signal(s, handler)
        # Flushed through the guards, so that the interpreter's flush at exit has nothing left to fail on.
        for guarded in (sys.stdout, sys.stderr):
            if guarded is not None:
                guarded.flush()
        sys.stdout, sys.stderr = streams
    return restore


def handled_signals():
    """The stop signals to handle: those not ignored. nohup starts a process with SIGHUP ignored,
    and a shell starts background jobs with SIGINT ignored; they stay ignored."""
    return [s for s in STOP_SIGNALS if signal.getsignal(s) != signal.SIG_IGN]


def raise_interrupted(signum, frame):
    raise Interrupted(signum)


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
        lost = next((x for x in checkpoint.exception_chain(e) if distributed.is_lost_contact(x)), None)
        if lost is not None:
            return report_error(lost if isinstance(lost, distributed.DistributedError)
                                else distributed.lost_contact(lost), 1, prog)
        stopped = signal_exit_in(e)
        if stopped is None:
            raise
        if isinstance(stopped, Interrupted):
            return report_error(f'interrupted by {stopped} before anything was saved.', 128 + stopped.signum, prog)
        return 128 + stopped.signum  # SecondSignal: its handler has said so


def signal_exit_in(error):
    """The SignalExit that error is, or was raised from or while handling, if any."""
    return next((e for e in checkpoint.exception_chain(error) if isinstance(e, SignalExit)), None)


class OutputThatMayClose:
    """sys.stdout or sys.stderr that outlives its reader (`main.py | head -3`, a closed terminal).

    The first write or flush that fails because the pipe or terminal is gone points the file
    descriptor at os.devnull (the Python docs' advice for SIGPIPE), so what the stream still
    holds and all later output are discarded, and the run goes on.
    """
    GONE = (errno.EPIPE, errno.EIO)  # a pipe without a reader; a terminal that hung up

    def __init__(self, stream):
        self.stream = stream

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def write(self, text):
        try:
            return self.stream.write(text)
        except OSError as e:
            self.discard_if_gone(e)
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except OSError as e:
            self.discard_if_gone(e)

    def discard_if_gone(self, error):
        if error.errno not in self.GONE:
            raise error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.stream.fileno())
        os.close(devnull)


def say(text):
    """Print text from a signal handler. The handler may have interrupted a write to stdout whose
    buffer then refuses a second writer (RuntimeError); the file descriptor takes the text instead."""
    try:
        print(text, flush=True)
    except RuntimeError:
        with contextlib.suppress(OSError):
            os.write(sys.stdout.fileno(), (text + '\n').encode())


class StopRequest:
    """SIGINT (Ctrl-C), SIGTERM or SIGHUP asks a loop to stop after the current step (a batch, a
    word); a second one quits at once by raising SecondSignal (exit code 128 + signum).

    Files are written atomically, so quitting at any moment leaves every saved file whole.
    Signals are counted through a wakeup fd: CPython runs the handler once for signals that
    arrive close together (while a long C call runs), but writes one byte per signal there.
    Only the main thread can enter a StopRequest.
    """
    BYTE_WAIT_S = 0.05  # the handler may run just before the C-level handler writes the byte

    def __init__(self, step='batch'):
        self.step = step
        self.signum = None
        self.quitting = False

    @property
    def requested(self):
        return self.signum is not None

    @property
    def exit_code(self):
        """0 when the loop ended or Ctrl-C stopped it (the user's choice); 128 + signum after SIGTERM or
        SIGHUP, which ask the process to end and get the shell's code for a killed process."""
        return 0 if self.signum in (None, signal.SIGINT) else 128 + self.signum

    def __enter__(self):
        self.read_end, self.write_end = os.pipe()
        os.set_blocking(self.write_end, False)  # set_wakeup_fd requires it
        self.previous_wakeup_fd = signal.set_wakeup_fd(self.write_end, warn_on_full_buffer=False)
        self.previous = {s: signal.signal(s, self.handle) for s in handled_signals()}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(self.previous_wakeup_fd)
        os.close(self.read_end)
        os.close(self.write_end)

    def handle(self, signum, frame):
        if self.quitting:
            return  # already on the way out: let the clean-up (removing a temporary file) finish
        # A call that finds no byte runs for a signal an earlier call has already counted.
        if select.select([self.read_end], [], [], self.BYTE_WAIT_S)[0]:
            for number in os.read(self.read_end, 4096):
                if number in STOP_SIGNALS:
                    self.receive(number)

    def receive(self, signum):
        if self.requested:
            self.quitting = True
            say('\n| second signal: exiting now')
            raise SecondSignal(signum)
        self.signum = signum
        say(f'\n| {signal.Signals(signum).name}: stopping after this {self.step} (once more to quit at once)')
