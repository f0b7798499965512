"""Waiting for and stopping processes that are not our children (so asyncio cannot wait)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

import psutil

log = logging.getLogger(__name__)

POLL_FALLBACK_S = 0.5  # only where pidfd_open is missing (Linux < 5.3, macOS)


async def wait_pid(pid: int) -> None:
    """Return once process `pid` has ended. Uses a pidfd on the event loop: no polling."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):  # no pidfd here: poll slowly instead
        while _alive(pid):  # noqa: ASYNC110 - without a pidfd there is nothing to await
            await asyncio.sleep(POLL_FALLBACK_S)
        return
    loop = asyncio.get_running_loop()
    ended = loop.create_future()

    def readable() -> None:
        if not ended.done():
            ended.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await ended
    finally:
        loop.remove_reader(fd)
        _reap(fd)
        os.close(fd)


def _reap(fd: int) -> None:
    """Reap the process if it is our child (the client runs as PID 1 in a container)."""
    try:
        os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
    except (ChildProcessError, AttributeError, OSError):
        pass


def alive(pid: int) -> bool:
    """Blocking. Is `pid` alive (a zombie is not)?"""
    return _alive(pid)


def _alive(pid: int) -> bool:
    try:
        # bool(): psutil is untyped, so mypy sees the comparison as Any
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def create_time(pid: int) -> float | None:
    """Blocking. The process's start time (psutil), or None when it has already gone."""
    try:
        created: float = psutil.Process(pid).create_time()
        return created
    except psutil.Error:
        return None


def pid_matches(pid: int, started: float | None, pgid: int) -> bool:
    """Blocking. Is `pid` still the live process we started (not a reused pid)?"""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if started is not None:
            created: float = proc.create_time()
            return abs(created - float(started)) < 0.05
        return os.getpgid(pid) == pgid
    except (psutil.Error, ProcessLookupError):
        return False


def pid_is(pid: int, started: float | None, pgid: int, var: str, value: str) -> bool:
    """Blocking. Is `pid` alive and ours: its start time (when known) matches, else its
    environment carries `var=value` (or, where that cannot be read, its group is `pgid`)."""
    if started is not None:
        return pid_matches(pid, started, pgid)
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        try:
            env: dict[str, str] = proc.environ()
            return env.get(var) == value
        except psutil.AccessDenied:
            return os.getpgid(pid) == pgid
    except (psutil.Error, ProcessLookupError):
        return False


def group_alive(pgid: int) -> bool:
    """Blocking. Does any process of group `pgid` still run (zombies do not count)?"""
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
        except (psutil.Error, ProcessLookupError):
            continue
    return False


def terminate_group(pgid: int, grace_s: float) -> None:
    """Blocking. SIGTERM the process group, then SIGKILL whatever is left after `grace_s`."""
    if not _signal_group(pgid, signal.SIGTERM):
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not group_alive(pgid):
            return
        time.sleep(0.05)
    log.info("process group %d outlived SIGTERM by %.1fs: SIGKILL", pgid, grace_s)
    _signal_group(pgid, signal.SIGKILL)


def _signal_group(pgid: int, sig: signal.Signals) -> bool:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError as exc:
        log.warning("cannot signal process group %d: %s", pgid, exc)
        return False
    return True
