"""One coordinator per data dir: an exclusive `flock` on `<data-dir>/coordinator.lock`.

Two coordinators on one SQLite data dir would each believe they own the queue. The lock is
taken by `gpumesh-coordinator` before anything in the directory is opened and held for the
life of the process (the kernel drops it when the process dies, even by `kill -9`, so a stale
lock never blocks a restart). The file holds the holder's pid, for the refusal message only.

Files at rest are the coordinator's alone: the data dir is 0700 and every file in it 0600
(tokens, node credentials, the SQLite files with their -wal/-shm, artifacts, the lock). The
process runs with umask 077 (coordinator/__main__.py), each place that creates a file or a
directory here names its mode too (`private_dir`, `private_sqlite`), and at start
`tighten_data_dir` narrows what an older version (or a hand) left wider.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
from pathlib import Path

LOCK_NAME = "coordinator.lock"
DIR_MODE, FILE_MODE = 0o700, 0o600
TIGHTEN_MAX_ENTRIES = 100_000  # the start-up walk looks at no more than this many entries

log = logging.getLogger(__name__)


class DataDirInUse(RuntimeError):
    """Another live process holds the data dir."""


def lock_data_dir(data_dir: Path) -> int:
    """Take the data dir for this process; the returned fd must stay open while it runs."""
    private_dir(data_dir)
    fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _pid_in(fd)
        os.close(fd)
        raise DataDirInUse(_in_use(data_dir, holder)) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    os.set_inheritable(fd, False)
    return fd


def data_dir_in_use(data_dir: Path) -> str | None:
    """Why `data_dir` is taken, or None; creates nothing (a missing dir is not in use)."""
    try:
        fd = os.open(data_dir / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _in_use(data_dir, _pid_in(fd))
    finally:
        os.close(fd)  # closing drops a lock taken just now
    return None


def _pid_in(fd: int) -> str:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return text if text.isdigit() else "unknown"


def _in_use(data_dir: Path, pid: str) -> str:
    return (f"the data dir {data_dir} is in use by a running coordinator (pid {pid}); "
            "stop it first, or give another --data-dir")


def private_dir(path: Path) -> None:
    """Create `path` (and missing parents) if need be; the directory itself is 0700 when this
    creates it, whatever the umask. An existing one is left as it is (`tighten_data_dir`)."""
    if path.is_dir():
        return
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    os.chmod(path, DIR_MODE)


def private_sqlite(path: Path) -> None:
    """Before SQLite opens `path`: create it 0600 if missing, and narrow it and its -wal,
    -shm and -journal files to the owner if wider. SQLite gives the files it creates beside
    a database the database's own mode, so they follow."""
    private_dir(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        _narrow(fd)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm", "-journal"):
        try:
            fd = os.open(f"{path}{suffix}", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            _narrow(fd)
        finally:
            os.close(fd)


def _narrow(fd: int) -> None:
    mode = os.fstat(fd).st_mode
    if mode & 0o077:
        os.fchmod(fd, stat.S_IMODE(mode) & ~0o077)


def tighten_data_dir(data_dir: Path, max_entries: int = TIGHTEN_MAX_ENTRIES) -> int:
    """At start: the data dir 0700, and group and other bits off every directory and regular
    file in it (symbolic links are not followed), looking at `max_entries` entries at most
    (the directory's own mode already keeps others out of the rest). Returns how many modes
    it changed; each change is logged once in a summary. Blocking: call before serving."""
    private_dir(data_dir)
    changed = _tighten(data_dir)
    seen = 0
    for root, dirs, files in os.walk(data_dir, followlinks=False):
        for name in dirs + files:
            seen += 1
            if seen > max_entries:
                log.warning("data dir %s: modes checked on the first %d entries only",
                            data_dir, max_entries)
                return changed
            changed += _tighten(Path(root) / name)
    if changed:
        log.warning("data dir %s: took group and other access off %d entries (now 0700 "
                    "directories, 0600 files)", data_dir, changed)
    return changed


def _tighten(path: Path) -> int:
    try:
        st = os.lstat(path)
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)) or not st.st_mode & 0o077:
            return 0  # a link, a socket, or already private
        os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o077)
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.warning("data dir: cannot narrow the mode of %s: %s", path, exc.strerror)
        return 0
    return 1
