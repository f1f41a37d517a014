"""SAVE.metrics.jsonl: what a training run prints, kept as JSON lines that plot.py (or anyone) can read.

One record per line, each with a "kind":

    run     when a run starts or resumes: flags, recipe, torch version, device
    train   each progress line: epoch, batch, step, lr, loss, ppl, ms/batch, tokens/s, loss scale, skipped
    epoch   each epoch's end: valid loss and ppl, epoch time, whether it was the best, lr after annealing
    end     the test of the best model: test loss and ppl, total time

Every record has "elapsed": seconds since the run started, the parts before a resume summed.
The records are written at the progress lines, whose loss the loop reads from the device anyway:
writing them adds no host sync to a step.

SAVE.resume records how long the file was when it was saved; --resume cuts the file back to that
length before appending, so records that a stopped or killed run wrote after it (which the resumed
run writes again) appear once.
"""
import json
import math
import os
import platform
import sys
import time

import torch


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
    """Appends records to path. A new run starts the file afresh; a resumed run (resume_bytes: the
    length SAVE.resume recorded) keeps what was written up to that point and appends to it, and
    its clock goes on from elapsed."""

    def __init__(self, path, resume_bytes=None, elapsed=0.0):
        self.started = time.time() - elapsed
        self.note = None
        self.file = None  # with path None (torchrun's ranks but 0) nothing is written
        if path is None:
            return
        if resume_bytes is not None and os.path.isfile(path) and os.path.getsize(path) >= resume_bytes:
            with open(path, 'r+b') as f:
                f.truncate(resume_bytes)
        elif resume_bytes:
            self.note = (f'{path} is missing or shorter than the {resume_bytes} bytes SAVE.resume expects: '
                         'it will hold the records from this resume on')
        self.file = open(path, 'a' if resume_bytes is not None else 'w', encoding='utf-8')

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
        self.file.write(json.dumps({'kind': kind, **fields, 'elapsed': round(self.elapsed(), 3)}) + '\n')
        self.file.flush()

    def size(self):
        """Bytes written so far: what SAVE.resume records."""
        return self.file.tell() if self.file else 0


def first_record(args, recipe, device, progress, nbatches, processes):
    """The fields of a run's first record (and of a resumed run's first); processes: torchrun's ranks, or 1."""
    return dict(script=os.path.basename(sys.argv[0]), flags=vars(args), recipe=recipe.name,
                precision=recipe.describe(), torch=torch.__version__, device=device_name(device), processes=processes,
                batches_per_epoch=nbatches, epoch=progress.epoch, batch=progress.next_batch, resumed=bool(args.resume))


def ppl(loss):
    """Perplexity, exp(loss); inf where exp overflows."""
    return math.exp(loss) if loss < 700 else float('inf')
