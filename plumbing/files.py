"""Files a run writes: atomically (a crash leaves the old file whole), and one run per --save (a lock)."""
import contextlib
import fcntl
import os
import re
import secrets

from plumbing.errors import SaveInUse, WriteError, exception_chain


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
    """One run per --save: an advisory lock on a hidden file beside it, held while the run lasts.

    The operating system drops the lock when the process dies, so a killed run never blocks
    the next. Holding it, the run removes the temporary files a killed run left beside SAVE.
    """

    def __init__(self, save):
        directory, name = os.path.split(os.path.abspath(save))
        self.save, self.directory, self.name = save, directory, name
        self.path = os.path.join(directory, f'.{name}.lock')

    def __enter__(self):
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 32).decode('ascii', 'replace').strip() or 'unknown'
                os.close(fd)
                raise SaveInUse(f'--save {self.save} is in use by another run (process {owner}); '
                                f'wait for it to finish or give another --save.') from None
            # The previous holder may have removed the file between our open and our lock: lock the file at path.
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f'{os.getpid()}\n'.encode())
        self.fd = fd
        self.remove_stale_temp_files()
        return self

    def __exit__(self, *exc):
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)

    def remove_stale_temp_files(self):
        """Temporary files of --save and SAVE.resume: only a killed run leaves them, and no other run may write them."""
        removed = 0
        for entry in os.scandir(self.directory):
            match = TEMP_NAME.fullmatch(entry.name)
            if match and match['name'] in (self.name, self.name + '.resume') and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
        if removed:
            print(f'| removed {removed} temporary file(s) that a killed run left beside {self.save}', flush=True)
