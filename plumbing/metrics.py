"""SAVE.metrics.jsonl: what a training run prints, kept as JSON lines that plot.py (or anyone) can read.

One record per line, each with a "kind":

    run     when a run starts or resumes: flags, recipe, torch version, device
    train   each progress line: epoch, batch, step, lr, loss, ppl, ms/batch, tokens/s, loss scale, skipped
    epoch   each epoch's end: valid loss and ppl, epoch time, whether it was the best, lr after annealing
    end     the test of the best model: test loss and ppl, total time

Every record has "elapsed": seconds since the run started, the parts before a resume summed.
The records are written at the progress lines, whose loss the loop reads from the device anyway:
writing them adds no host sync to a step.

SAVE.resume records how long the file was when it was saved, and the SHA-256 of those bytes;
--resume keeps those bytes (in a new file) and appends to them, so records that a stopped or killed
run wrote after it (which the resumed run writes again) appear once. Floats JSON cannot hold
(inf, NaN) are written as null.
"""
import contextlib
import hashlib
import json
import math
import os
import platform
import secrets
import stat
import sys
import time

import torch

from plumbing.cli import check_input_file
from plumbing.errors import DataError
from plumbing.files import temp_name


def cpu_model():
    """The CPU's model name, as /proc/cpuinfo gives it (CPU timings depend on it more than on anything else)."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'


def device_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    if device.type == 'cpu':
        return f'{cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)'
    return str(device)


class MetricsFile:
    """Appends records to path. A new run starts the file afresh; a resumed run (resume_bytes and
    resume_sha256: the length and SHA-256 of the file that SAVE.resume recorded) keeps what was
    written up to that point and appends to it, and its clock goes on from elapsed.

    The file is recognised as this run's by its content: a file whose first resume_bytes bytes do not
    hash to resume_sha256 (another run's, or cut short) is started anew, with a note. The file is never
    written in place: the kept records are copied to a new file that replaces path (a hard link at path
    keeps its old content).
    """

    def __init__(self, path, resume_bytes=None, elapsed=0.0, resume_sha256=None):
        self.started = time.time() - elapsed
        self.note = None
        self.file = None  # with path None (torchrun's ranks but 0) nothing is written
        self.sha256 = hashlib.sha256()
        if path is None:
            return
        kept = b''
        if resume_bytes:
            kept = our_records(path, resume_bytes, resume_sha256)
            if kept is None:
                kept = b''
                self.note = (f'{path} is missing or shorter than the {resume_bytes} bytes SAVE.resume expects, or '
                             "holds another run's records: it will hold the records from this resume on")
        self.file = new_file(path)
        self.file.write(kept)
        self.sha256.update(kept)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.file:
            self.file.close()

    def elapsed(self):
        return time.time() - self.started

    def write(self, kind, **fields):
        if self.file is None:
            return
        record = json_value({'kind': kind, **fields, 'elapsed': round(self.elapsed(), 3)})
        line = (json.dumps(record, allow_nan=False) + '\n').encode()
        self.file.write(line)
        self.file.flush()
        self.sha256.update(line)

    def size(self):
        """Bytes written so far: what SAVE.resume records."""
        return self.file.tell() if self.file else 0

    def digest(self):
        """The SHA-256 of the bytes written so far: what SAVE.resume records beside the length."""
        return self.sha256.hexdigest() if self.file else None


def json_value(value):
    """value, with the floats JSON has no word for (inf, NaN) as null, also inside the flags."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_value(v) for k, v in value.items()}
    return value


def our_records(path, nbytes, sha256):
    """The first nbytes bytes of the regular file at path if they hash to sha256 (SAVE.resume written
    before the hash was recorded: sha256 None, the length alone decides); None if not."""
    try:
        with open(path, 'rb', buffering=0) as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            kept = f.read(nbytes)
    except OSError:
        return None
    if len(kept) < nbytes or sha256 is not None and hashlib.sha256(kept).hexdigest() != sha256:
        return None
    return kept


def new_file(path):
    """A new file that replaces path at once, open for appending (never path's old file, which may be a hard link)."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, temp_name(name, os.getpid(), secrets.token_hex(4)))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return os.fdopen(fd, 'wb')


def first_record(args, recipe, device, progress, nbatches, processes):
    """The fields of a run's first record (and of a resumed run's first); processes: torchrun's ranks, or 1."""
    return dict(script=os.path.basename(sys.argv[0]), flags=vars(args), recipe=recipe.name,
                precision=recipe.describe(), torch=torch.__version__, device=device_name(device), processes=processes,
                batches_per_epoch=nbatches, epoch=progress.epoch, batch=progress.next_batch, resumed=bool(args.resume))


# What plot.py reads of each kind of record (every record has elapsed too).
RECORD_KEYS = {'run': ('recipe', 'flags', 'device', 'batches_per_epoch'),
               'train': ('epoch', 'batch', 'step', 'ppl', 'loss_scale'),
               'epoch': ('epoch', 'valid_ppl'),
               'end': ()}


def read_run(path):
    """The records of one metrics file, checked: a run record first, then train, epoch and end records,
    each with the fields plot.py reads (numbers, or null where a float was inf or NaN)."""
    check_input_file('', path)
    records = []
    try:
        with open(path, encoding='utf-8') as f:
            for number, line in enumerate(f, 1):
                records.append(checked_record(path, number, line))
    except UnicodeDecodeError:
        raise DataError(f'{path} is not a text file (not UTF-8); is it a SAVE.metrics.jsonl file?') from None
    except OSError as e:
        raise DataError(f'{path} cannot be read ({e.strerror}).') from None
    if not records or records[0]['kind'] != 'run':
        raise DataError(f'{path} does not start with a run record; is it a SAVE.metrics.jsonl file?')
    return records


def checked_record(path, number, line):
    try:
        record = json.loads(line)
    except ValueError:
        raise DataError(f'{path} line {number} is not a JSON record; is it a SAVE.metrics.jsonl file?') from None
    if not isinstance(record, dict) or record.get('kind') not in RECORD_KEYS:
        raise DataError(f'{path} line {number} is not a record that training writes.')
    kind = record['kind']
    if number == 1 and kind != 'run':
        raise DataError(f'{path} does not start with a run record; is it a SAVE.metrics.jsonl file?')
    missing = [key for key in RECORD_KEYS[kind] + ('elapsed',) if key not in record]
    if missing:
        raise DataError(f"{path} line {number}: its {kind} record has no {' and no '.join(missing)}.")
    is_number = lambda x: type(x) in (int, float)
    numbers = [key for key in RECORD_KEYS[kind] + ('elapsed',) if key not in ('recipe', 'flags', 'device')]
    # ppl and loss_scale are null where they were inf (or where the recipe does not scale).
    wrong = [key for key in numbers
             if not (is_number(record[key]) or record[key] is None and key.endswith(('ppl', 'scale')))]
    if kind == 'run' and not (type(record['batches_per_epoch']) is int and record['batches_per_epoch'] >= 1):
        wrong.append('batches_per_epoch')
    if kind == 'run' and not (isinstance(record['flags'], dict) and isinstance(record['recipe'], str)):
        wrong.append('flags')
    if wrong:
        raise DataError(f"{path} line {number}: its {kind} record's {', '.join(wrong)} is not what training writes.")
    return record


def ppl(loss):
    """Perplexity, exp(loss); inf where exp overflows."""
    return math.exp(loss) if loss < 700 else float('inf')
