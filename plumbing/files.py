"""Files a run writes: atomically (a crash leaves the old file whole), and one run per --save (a lock)."""
import contextlib
import fcntl
import os
import re
import secrets
import stat

from plumbing.errors import SaveInUse, UsageError, WriteError, exception_chain


@contextlib.contextmanager
def atomic_write(path, mode='wb', **open_args):
    """A file object for a temporary file beside path, renamed over path once the block ends.

    A crash or Ctrl-C during the write leaves the previous file at path intact and no
    temporary file behind. The file gets an ordinary file's permissions under the umask.
    An error while writing becomes a WriteError saying why.
    """
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, temp_name(name, os.getpid(), secrets.token_hex(4)))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask, as open() does
        with os.fdopen(fd, mode, **open_args) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # also a second Ctrl-C, which may come after the rename
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        reason = os_error(e)
        if reason is not None:
            raise WriteError(f'could not write {path} ({reason})') from None
        raise


def temp_name(name, pid, token):
    """The name atomic_write writes name's new content under first, beside it (token: 8 hex digits)."""
    return f'.{name}.{pid}.{token}.tmp'


TEMP_NAME = re.compile(r'\.(?P<name>.+)\.\d+\.[0-9a-f]{8}\.tmp')  # what temp_name makes


def os_error(e):
    """What the operating system said, if e is an OSError or was raised while handling one (torch.save
    wraps a failed write in a RuntimeError); None if there is none, or if e comes from a signal or an exit."""
    chain = list(exception_chain(e))
    if not all(isinstance(x, Exception) for x in chain):
        return None
    return next((x.strerror or str(x) for x in chain if isinstance(x, OSError)), None)


class SaveLock:
    """One run per file it writes: an advisory lock on a hidden file beside each (.NAME.lock), held
    while the run lasts. flag, path: the file named on the command line (--save); others: (name, path)
    pairs of the other files the run writes (SAVE.resume, ...), so that `--save x.pt` and
    `--save x.pt.resume` cannot both write x.pt.resume.

    The operating system drops the locks when the process dies, so a killed run never blocks
    the next. A lock file that is not a regular file of its own (a symbolic link, hard link,
    directory or FIFO) is refused, never followed. Holding the locks, the run removes the
    temporary files a killed run left beside the files it writes.
    """

    def __init__(self, path, flag='--save', others=()):
        self.save, self.flag = path, flag
        self.files = [(flag, path), *others]
        self.directory = os.path.dirname(os.path.abspath(path))

    def __enter__(self):
        self.held = []
        try:
            for name, path in self.files:
                self.held.append(take_lock(name, path, self.flag))
        except BaseException:
            self.__exit__()
            raise
        self.remove_stale_temp_files()
        return self

    def __exit__(self, *exc):
        for path, fd in self.held:
            # Only our own lock file: not one that replaced it.
            with contextlib.suppress(OSError):
                if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                    os.unlink(path)
            os.close(fd)
        self.held = []

    def remove_stale_temp_files(self):
        """Temporary files of the files the run writes: only a killed run leaves them, and no other run writes them."""
        names = {os.path.basename(os.path.abspath(path)) for _, path in self.files}
        removed = 0
        for entry in os.scandir(self.directory):
            match = TEMP_NAME.fullmatch(entry.name)
            if match and match['name'] in names and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
        if removed:
            print(f'| removed {removed} temporary file(s) that a killed run left beside {self.save}', flush=True)


def lock_name(path):
    """The lock file of path: .NAME.lock beside it."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f'.{name}.lock')


def take_lock(name, path, flag):
    """(lock file, its descriptor) for path, locked; SaveInUse if another run holds it."""
    lock = lock_name(path)
    while True:
        fd = open_lock_file(lock, name, path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode('ascii', 'replace').strip() or 'unknown'
            os.close(fd)
            raise SaveInUse(f'{name} {path} is in use by another run (process {owner}); '
                            f'wait for it to finish or give another {flag}.') from None
        # The previous holder may have removed the file between our open and our lock: lock the file at path.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f'{os.getpid()}\n'.encode())
    return lock, fd


def open_lock_file(lock, name, path):
    """A descriptor of the lock file, created if missing; a UsageError if it is not a regular file of its own."""
    try:
        # O_NOFOLLOW: a symbolic link is refused, not followed; O_NONBLOCK: a FIFO does not hang the open.
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        kind = 'a symbolic link' if os.path.islink(lock) else 'a directory' if os.path.isdir(lock) else e.strerror
        raise UsageError(f'{lock}, the lock file of {name} {path}, cannot be used ({kind}); remove it.') from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        kind = 'a hard link to another file' if stat.S_ISREG(info.st_mode) else 'not a regular file'
        raise UsageError(f'{lock}, the lock file of {name} {path}, cannot be used ({kind}); remove it.')
    return fd
