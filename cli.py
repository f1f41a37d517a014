"""Command-line plumbing every script shares: one-sentence errors and the device flags."""
import os
import sys

import torch


def fail(message, code=1):
    """Print one sentence naming the problem and exit (2 for bad flags, 1 for bad files)."""
    print(f'{os.path.basename(sys.argv[0])}: error: {message}', file=sys.stderr)
    sys.exit(code)


def check_output_file(flag, path):
    """A file a script will write: named, not a directory, in a writable directory (else exit 2)."""
    if not path:
        fail(f'{flag} must name a file.', 2)
    if os.path.isdir(path):
        fail(f'{flag} {path} is a directory; give a file name.', 2)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        fail(f'{flag} {path}: directory {directory} does not exist.', 2)
    if not os.access(directory, os.W_OK):
        fail(f'{flag} {path}: directory {directory} is not writable.', 2)


def add_device_flags(parser):
    parser.add_argument('--cuda', action='store_true', help='run on the CUDA device')
    parser.add_argument('--accel', action='store_true',
                        help='use the accelerator torch.accelerator finds (CUDA, MPS, XPU, ...)')


def select_device(args):
    """The device the flags ask for; asking for one that is missing is an error."""
    if args.cuda:
        if not torch.cuda.is_available():
            fail('--cuda was given but no CUDA device is available.')
        return torch.device('cuda')
    if args.accel:
        if not torch.accelerator.is_available():
            fail('--accel was given but torch.accelerator finds no accelerator (CUDA, MPS, XPU, ...).')
        return torch.accelerator.current_accelerator()
    if torch.cuda.is_available():
        print('WARNING: You have a CUDA device, so you should probably run with --cuda')
    return torch.device('cpu')
