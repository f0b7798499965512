"""A user per attempt: the uid/gid a process task runs as when the client is root.

Systemd's DynamicUser is the model: each attempt takes a free uid from the reserved range
(MESH_TASK_UIDS, default 60000-60999) and its gid is the same number; no /etc/passwd entry
is needed (the launcher is started with the numeric ids and no supplementary groups). A uid
is never shared by two attempts of this client: taken when the attempt's files are written,
given back on `release()`, after every process running under it has been ended
(`end_uid`). After a client restart the uids of the attempts it adopts stay taken: the pool
is seeded from the uids the client itself recorded (its launch journal, root-only).

Blocking (psutil scans): call through asyncio.to_thread.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterable

import psutil

DEFAULT_TASK_UIDS = (60000, 60999)
END_POLL_S = 0.02


class NoFreeUid(Exception):
    """Every uid of the range is taken by a running attempt."""


class UidPool:
    """Free uids of one range; `take(name)` / `free(name)`, thread-safe."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self._lock = threading.Lock()
        self._taken: dict[str, int] = {}

    def seed(self, taken: Iterable[tuple[str, int]]) -> None:
        """Mark uids of attempts a previous client left (read from the journal) as taken."""
        with self._lock:
            for name, uid in taken:
                if self.first <= uid <= self.last:
                    self._taken.setdefault(name, uid)

    def take(self, name: str) -> int:
        with self._lock:
            if name in self._taken:
                return self._taken[name]
            used = set(self._taken.values())
            for uid in range(self.first, self.last + 1):
                if uid not in used:
                    self._taken[name] = uid
                    return uid
        raise NoFreeUid(f"all {self.last - self.first + 1} task uids ({self.first}-{self.last}) "
                        "are taken by running attempts")

    def free(self, name: str) -> None:
        with self._lock:
            self._taken.pop(name, None)

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

