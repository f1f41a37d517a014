"""Stop signals and output that may close: Ctrl-C, SIGTERM and SIGHUP stop a loop after its current
step (a second one quits at once), and a closed pipe or terminal does not end the run."""
import contextlib
import errno
import os
import select
import signal
import sys
import threading
import time

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
        WAKEUP_READ_ENDS.append(self.read_end)
        self.previous = {s: signal.signal(s, self.handle) for s in handled_signals()}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(self.previous_wakeup_fd)
        WAKEUP_READ_ENDS.remove(self.read_end)
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


# The read ends of the wakeup fds in use, the current one last (watch_stuck_waits reads it).
WAKEUP_READ_ENDS = []
STUCK_GRACE_S = 5.0  # how long a signal may wait for Python's handler before the process ends without it


def watch_stuck_waits():
    """Honour a stop signal while the main thread waits in C code for other processes (torchrun's ranks).

    Python runs a signal handler only between two bytecodes of the main thread, never during a wait of
    torch.distributed, which lasts until the wait's timeout. A thread watches the wakeup fd: a stop
    signal whose byte nobody has read for STUCK_GRACE_S seconds ends the process with one sentence and
    exit code 128 + signum. Every file is written atomically, so each one is whole.
    """
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    WAKEUP_READ_ENDS.append(read_end)
    threading.Thread(target=end_if_stuck, name='stuck-wait-watch', daemon=True).start()


def end_if_stuck():
    pending_since = None
    while True:
        time.sleep(0.25)
        try:
            fd = WAKEUP_READ_ENDS[-1]
            ready = select.select([fd], [], [], 0)[0]
        except (IndexError, OSError, ValueError):  # a StopRequest ended meanwhile
            pending_since = None
            continue
        pending_since = (pending_since or time.monotonic()) if ready else None
        if pending_since is None or time.monotonic() - pending_since < STUCK_GRACE_S:
            continue
        with contextlib.suppress(OSError):
            signums = [n for n in os.read(fd, 4096) if n in STOP_SIGNALS]
            if signums:
                name = signal.Signals(signums[0]).name
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    print(f'{os.path.basename(sys.argv[0])}: error: stopped by {name} while waiting for the other '
                          'ranks, which do not answer; the files saved before are whole.', file=sys.stderr, flush=True)
                os._exit(128 + signums[0])
        pending_since = None
