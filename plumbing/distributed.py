"""Data-parallel training under torchrun. training.py reads the same with one process or many.

    torchrun --nproc_per_node 2 main.py --cuda --fp16 ...

torchrun starts one process (a *rank*) per GPU (or several on a CPU) and tells each its rank
through the environment. Each rank trains its share of the --batch_size columns:

    the batchified training text, --batch_size 4, 2 ranks:

        a g m s          rank 0: a g      rank 1: m s
        b h n t    -->           b h              n t
        c i o u                  c i              o u
        ...                      ...              ...

Each keeps the hidden state of its own columns. Each rank's loss is its share of the mean over
all columns (its own mean / ranks), and DistributedDataParallel sums the gradients of all ranks
during backward, so every rank holds the gradients of one process training all the columns and
makes the same update (the same overflow decision, the same loss scale).

Without torchrun World is rank 0 of 1: nothing is wrapped, nothing is sent.
"""
import datetime
import math
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from plumbing.errors import DistributedError, UsageError
from plumbing.signals import watch_stuck_waits

# A rank that waits longer than this for the others (one died, hangs or never came) gives up with an error:
# WORD_LM_PEER_TIMEOUT seconds (an environment variable, like torchrun's own settings; 60 by default).
PEER_TIMEOUT_VARIABLE, PEER_TIMEOUT_S = 'WORD_LM_PEER_TIMEOUT', 60.0


class World:
    """This process's place among the ranks, and what they exchange."""

    def __init__(self):
        self.rank, self.size, self.local_rank = (environment_int(name) for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'))
        if self.size < 1 or not 0 <= self.rank < self.size or self.local_rank < 0:
            raise UsageError(f'RANK={self.rank}, WORLD_SIZE={self.size} and LOCAL_RANK={self.local_rank} in the '
                             'environment do not describe a process of torchrun; unset them, or start the script with '
                             'torchrun.')
        # Under torchrun even one process joins a process group (NCCL or gloo), so that
        # `torchrun --nproc_per_node 1` runs the code of many ranks; started plainly, a process is alone.
        self.alone = self.size == 1 and 'TORCHELASTIC_RUN_ID' not in os.environ
        self.cpu_group = None  # the group that exchanges CPU objects (RNG states, stop requests)

    @property
    def is_main(self):
        """Rank 0 prints, and writes --save, SAVE.resume and SAVE.metrics.jsonl."""
        return self.rank == 0

    def start(self, device):
        """Join the other ranks: NCCL between GPUs, gloo on the CPU. The other ranks print nothing."""
        if self.alone:
            return
        if not (os.environ.get('MASTER_ADDR') and os.environ.get('MASTER_PORT')):
            raise UsageError(f'WORLD_SIZE={self.size} in the environment asks for {self.size} processes, but '
                             'MASTER_ADDR and MASTER_PORT are not set; start the script with torchrun, or unset '
                             'WORLD_SIZE.')
        timeout = peer_timeout()
        # Ctrl-C, SIGTERM and SIGHUP are honoured during the waits for the other ranks too.
        watch_stuck_waits()
        if device.type == 'cuda':
            torch.cuda.set_device(device)
            dist.init_process_group('nccl', timeout=timeout, device_id=device)
            self.cpu_group = dist.new_group(backend='gloo', timeout=timeout)
        else:
            dist.init_process_group('gloo', timeout=timeout)
        if not self.is_main:
            sys.stdout = open(os.devnull, 'w')

    def close(self):
        """Leave together: a rank that tears its connections down while others still use them can crash."""
        if not self.alone and dist.is_initialized():
            self.barrier()
            dist.destroy_process_group()

    def columns(self, batch_size):
        """This rank's share of the batch columns (batch_size a multiple of the ranks)."""
        share = batch_size // self.size
        return slice(self.rank * share, (self.rank + 1) * share)

    def wrap(self, model):
        """The model to train through: under torchrun, DistributedDataParallel around it, summing the
        ranks' gradients (training.train_batch gives each rank its share of the loss: mean / ranks)."""
        if self.alone:
            return model
        device = next(model.parameters()).device
        parallel = DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None)
        parallel.register_comm_hook(None, sum_gradients)
        return parallel

    def mean(self, tensor):
        """The mean of tensor over the ranks (tensor itself with one rank)."""
        if self.alone:
            return tensor
        tensor = tensor.clone()
        self._collective(dist.all_reduce, tensor)
        return tensor / self.size

    def any(self, flag):
        """Whether flag is true on any rank: all ranks stop after the same batch."""
        if self.alone:
            return flag
        t = torch.tensor([int(flag)])
        self._collective(dist.all_reduce, t, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return bool(t)

    def from_main(self, value):
        """Rank 0's value (a float, or any picklable object) on every rank, so that all decide alike."""
        if self.alone:
            return value
        box = [value]
        self._collective(dist.broadcast_object_list, box, src=0, group=self.cpu_group)
        return box[0]

    def gather(self, value):
        """Every rank's value (picklable, on the CPU), in rank order."""
        if self.alone:
            return [value]
        values = [None] * self.size
        self._collective(dist.all_gather_object, values, value, group=self.cpu_group)
        return values

    def gather_columns(self, hidden):
        """The RNN state of all the columns (None, a tensor or a tuple, batch in dim 1) from each rank's share."""
        if self.alone or hidden is None:
            return hidden
        if isinstance(hidden, tuple):
            return tuple(self.gather_columns(h) for h in hidden)
        shares = [torch.empty_like(hidden) for _ in range(self.size)]
        self._collective(dist.all_gather, shares, hidden.contiguous())
        return torch.cat(shares, dim=1)

    def my_columns(self, hidden, batch_size):
        """This rank's share of a state that holds all the columns."""
        if self.alone or hidden is None:
            return hidden
        if isinstance(hidden, tuple):
            return tuple(self.my_columns(h, batch_size) for h in hidden)
        return hidden[:, self.columns(batch_size)].contiguous()

    def barrier(self):
        if not self.alone:
            self._collective(dist.barrier, group=self.cpu_group)

    def _collective(self, function, *args, **kwargs):
        try:
            function(*args, **kwargs)
        except RuntimeError as e:  # torch.distributed's errors (DistError) are RuntimeErrors
            raise lost_contact(e) from None


def peer_timeout():
    """How long a rank waits for the others: WORD_LM_PEER_TIMEOUT seconds, 60 by default."""
    text = os.environ.get(PEER_TIMEOUT_VARIABLE, str(PEER_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise UsageError(f'{PEER_TIMEOUT_VARIABLE}={text} in the environment must be a positive number of seconds.')
    return datetime.timedelta(seconds=seconds)


def environment_int(name):
    """torchrun's variable name as an integer (0 for RANK and LOCAL_RANK, 1 for WORLD_SIZE when unset)."""
    value = os.environ.get(name, '1' if name == 'WORLD_SIZE' else '0')
    try:
        return int(value)
    except ValueError:
        raise UsageError(f'{name}={value} in the environment is not a whole number; torchrun sets it, '
                         'and without torchrun it should be unset.') from None


def sum_gradients(state, bucket):
    """DDP's gradient exchange, summing where DDP would average. Each rank's loss is its share of
    the mean over all columns, so each rank's gradients (of activations too) are as large as one
    process's: an fp16 recipe overflows, and skips, exactly where one process would."""
    exchange = dist.all_reduce(bucket.buffer(), async_op=True)
    return exchange.get_future().then(lambda done: done.value()[0])


# What gloo and NCCL say, inside a backward pass's RuntimeError, when a rank is gone.
LOST_CONTACT_SIGNS = ('Connection closed by peer', 'Connection reset by peer', 'Broken pipe', 'NCCL', 'timed out',
                      'Timed out')


def is_lost_contact(error):
    """Whether error, raised under torchrun, says that another rank is gone."""
    if isinstance(error, DistributedError):
        return True
    under_torchrun = ('TORCHELASTIC_RUN_ID' in os.environ
                      or os.environ.get('WORLD_SIZE', '1').strip() not in ('', '0', '1'))
    return under_torchrun and (isinstance(error, dist.DistError) or isinstance(error, RuntimeError)
                               and any(sign in str(error) for sign in LOST_CONTACT_SIGNS))


def lost_contact(error):
    """The one sentence for error: what the backend saw, in its own words where they are short."""
    text = str(error).strip()
    seen = next((sign for sign in LOST_CONTACT_SIGNS if sign in text), None)
    seen = seen or (text.splitlines()[0][:120] if text else type(error).__name__)
    seconds = os.environ.get(PEER_TIMEOUT_VARIABLE, f'{PEER_TIMEOUT_S:g}')
    waited = f': no answer for {seconds} s, {PEER_TIMEOUT_VARIABLE}' if seen.lower() == 'timed out' else ''
    return DistributedError(f"rank {os.environ.get('RANK', '0')} lost contact with the other ranks ({seen}{waited}); "
                            'one of them stopped, died or never came, and its own output says why.')
