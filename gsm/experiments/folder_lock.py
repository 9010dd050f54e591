"""One run per experiment folder: an exclusive operating-system lock per stage folder.

The lock is `fcntl.flock` on `<family>/.locks/<folder name>.lock` (beside the stage folders, so that a finished
folder is never written again), and the file holds the owner's pid for the message another run prints. The
kernel releases the lock when its process ends, however it ends (a SIGKILLed run never blocks the next one).
A lock is held through one open file description: a second `FolderLock` on the same folder conflicts with the
first one, also within one process.
"""
import errno
import os
from contextlib import contextmanager
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None

LOCKS_DIR = ".locks"


class FolderBusy(RuntimeError):
    """A stage folder is locked by another run."""


class FolderLock:
    """The exclusive lock of one stage folder (which need not exist yet)."""

    def __init__(self, folder: os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder.parent / LOCKS_DIR / f"{self.folder.name}.lock"
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def owner(self) -> Optional[int]:
        """The pid written by the run that holds (or last held) the lock, if readable."""
        try:
            return int(self.path.read_text(encoding="ascii").strip() or "x")
        except (OSError, ValueError):
            return None

    def try_acquire(self) -> bool:
        """Take the lock without waiting; False when another run holds it."""
        if self.held:
            return True
        if fcntl is None:
            return True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # e.g. a file where the experiment family's folder should be: name the stage
            raise OSError(exc.errno, exc.strerror, str(self.folder)) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._fd = fd
        return True

    def acquire(self, on_wait: Callable[["FolderLock"], None] = lambda lock: None, poll_s: float = 0.5) -> None:
        """Take the lock, waiting as long as another run holds it; `on_wait` is called once before waiting."""
        if self.try_acquire():
            return
        on_wait(self)
        while not self.try_acquire():
            time.sleep(poll_s)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def report_waiting(lock: FolderLock) -> None:
    pid = lock.owner()
    print(f"waiting for {lock.folder}, in use by another run{f' (pid {pid})' if pid else ''}", file=sys.stderr,
          flush=True)


def lock_or_fail(folder: os.PathLike) -> FolderLock:
    """The lock of a folder that belongs to this run alone, taken without waiting: raises FolderBusy, naming
    the folder and the other run's pid, when another run holds it."""
    lock = FolderLock(folder)
    if not lock.try_acquire():
        pid = lock.owner()
        raise FolderBusy(f"{lock.folder} is in use by another run{f' (pid {pid})' if pid else ''}; wait for it to "
                         f"finish, or stop it, or use another --out-root")
    return lock


@contextmanager
def shared_folder(folder: os.PathLike, enabled: bool = True) -> Iterator[None]:
    """Hold the lock of a folder that several runs share (a base, a magnitude retrain) for the block, waiting
    for it with one line on stderr while another run holds it; `enabled` False (ranks other than 0) skips it."""
    lock = FolderLock(folder)
    if enabled:
        lock.acquire(on_wait=report_waiting)
    try:
        yield
    finally:
        lock.release()
