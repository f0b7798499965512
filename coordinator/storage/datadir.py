"""One coordinator per data dir: an exclusive `flock` on `<data-dir>/coordinator.lock`.

Two coordinators on one SQLite data dir would each believe they own the queue. The lock is
taken by `gpumesh-coordinator` before anything in the directory is opened and held for the
life of the process (the kernel drops it when the process dies, even by `kill -9`, so a stale
lock never blocks a restart). The file holds the holder's pid, for the refusal message only.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "coordinator.lock"


class DataDirInUse(RuntimeError):
    """Another live process holds the data dir."""


def lock_data_dir(data_dir: Path) -> int:
    """Take the data dir for this process; the returned fd must stay open while it runs."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
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
