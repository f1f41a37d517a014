"""The errors a user sees. Each is one sentence; each class carries the exit code the script
ends with, and each script's __main__ (plumbing.cli.guarded_main) prints the sentence and
returns that code: 2 for a command line that cannot work, 1 for unusable files or a failed run."""


class ExampleError(Exception):
    """An error worded for the user, ending the script with exit_code."""
    exit_code = 1


class UsageError(ExampleError):
    """A flag or path on the command line that cannot work."""
    exit_code = 2


class DataError(ExampleError):
    """A problem with the corpus files."""


class CheckpointError(ExampleError):
    """A checkpoint that cannot be used."""


class CannotResume(CheckpointError):
    """A sound checkpoint that --resume cannot continue with these flags (a usage error)."""
    exit_code = 2


class SaveInUse(ExampleError):
    """Another run holds the lock on this --save."""
    exit_code = 2


class WriteError(ExampleError):
    """A file that could not be written (disk full, permissions, ...); the previous file is kept."""


class TrainingDiverged(ExampleError):
    """The loss or the gradients are inf or NaN where no loss scale can explain it."""


class DistributedError(ExampleError):
    """Contact with another rank was lost: it stopped, died or hangs."""


def exception_chain(error):
    """error, and every exception it was raised from or while handling, each once."""
    pending, seen = [error], set()
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        pending += [e.__cause__, e.__context__]
