"""A user per attempt: the uid/gid a process task runs as when the client is root.

Systemd's DynamicUser is the model: each attempt takes a free uid from the reserved range
(MESH_TASK_UIDS, default 60000-60999) and its gid is the same number; no /etc/passwd entry
is needed (the launcher is started with the numeric ids and no supplementary groups). A uid
is never shared by two attempts of this client: taken when the attempt's files are written,
given back on `release()`, after every process running under it has been ended
(`end_uid`). After a client restart the uids of the attempts it adopts stay taken: the pool
is seeded from the uids the client itself recorded (its launch journal, root-only).

Several clients on one host (one per GPU set, or a test's three) share the range, so a uid
is also claimed host-wide: an exclusive `flock` on `LOCK_DIR/<uid>`, held while the attempt
holds the uid and let go by the kernel when the client dies. Without it two clients hand the
same uid to two attempts, and ending one attempt (`end_uid`) kills the other.

Blocking (psutil scans): call through asyncio.to_thread.
"""

from __future__ import annotations

import fcntl
import os
import signal
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

DEFAULT_TASK_UIDS = (60000, 60999)
LOCK_DIR = Path("/run/gpumesh/task-uids")  # host-wide claims (root-only, tmpfs: gone at boot)
END_POLL_S = 0.02


class NoFreeUid(Exception):
    """Every uid of the range is taken by a running attempt."""


class UidPool:
    """Free uids of one range; `take(name)` / `free(name)`, thread-safe."""

    def __init__(self, first: int, last: int, lock_dir: Path | None = LOCK_DIR) -> None:
        self.first, self.last = first, last
        self._lock = threading.Lock()
        self._taken: dict[str, int] = {}
        self._claims: dict[int, int] = {}  # uid -> the fd holding its host-wide flock
        self._lock_dir = lock_dir
        if lock_dir is not None:
            try:
                lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError:
                self._lock_dir = None  # no /run (or not root): claims within this client only

    def _claim(self, uid: int) -> bool:
        """Claim `uid` host-wide; False when another client holds it. Two syscalls on a
        tmpfs, no scan: cheap enough for the launch path."""
        if self._lock_dir is None or uid in self._claims:
            return True
        try:
            fd = os.open(self._lock_dir / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return True  # the claim file cannot be made: fall back to this client's own pool
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._claims[uid] = fd
        return True

    def _unclaim(self, uid: int) -> None:
        fd = self._claims.pop(uid, None)
        if fd is not None:
            os.close(fd)  # closing the only descriptor lets the flock go

    def seed(self, taken: Iterable[tuple[str, int]]) -> None:
        """Mark uids of attempts a previous client left (read from the journal) as taken."""
        with self._lock:
            for name, uid in taken:
                if self.first <= uid <= self.last:
                    self._taken.setdefault(name, uid)
                    self._claim(uid)  # ours before the restart; taken again if still free

    def take(self, name: str) -> int:
        with self._lock:
            if name in self._taken:
                return self._taken[name]
            used = set(self._taken.values())
            for uid in range(self.first, self.last + 1):
                if uid not in used and self._claim(uid):
                    self._taken[name] = uid
                    return uid
        raise NoFreeUid(f"all {self.last - self.first + 1} task uids ({self.first}-{self.last}) "
                        "are taken by running attempts (of this client or others on the host)")

    def free(self, name: str) -> None:
        with self._lock:
            uid = self._taken.pop(name, None)
            if uid is not None and uid not in self._taken.values():
                self._unclaim(uid)

    def taken(self) -> dict[str, int]:
        with self._lock:
            return dict(self._taken)


def owner(pid: int) -> int | None:
    """The real uid of process `pid`, or None if there is none (a zombie still answers)."""
    try:
        return int(psutil.Process(pid).uids().real)
    except (psutil.Error, OSError):
        return None


def end_uid(uid: int, wait_s: float = 5.0) -> int:
    """SIGKILL every process whose real or effective uid is `uid` (an attempt's own uid: all
    of them are the attempt's, whatever group, session or environment they moved to), and
    wait (bounded) until none is left. Returns how many were signalled."""
    if uid == 0 or uid == os.geteuid():
        return 0  # never the client's own user (or root): only a task uid of the range
    signalled: set[int] = set()
    deadline = time.monotonic() + wait_s
    while True:
        left = [p for p in psutil.process_iter(["uids", "status"])
                if p.info["uids"] is not None and p.info["status"] != psutil.STATUS_ZOMBIE
                and uid in (p.info["uids"].real, p.info["uids"].effective)]
        if not left or time.monotonic() > deadline:
            return len(signalled)
        for p in left:
            try:
                os.kill(p.pid, signal.SIGKILL)
                signalled.add(p.pid)
            except OSError:
                pass
        time.sleep(END_POLL_S)

