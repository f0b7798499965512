"""A task's whole process tree: found, ended and waited for, so nothing outlives its task.

Every process of an attempt is marked twice: it inherits `GPUMESH_ATTEMPT=<task>.<attempt>` in
its environment, and, where the node has a writable cgroup v2 hierarchy (root, or a delegated
subtree), it lives in a cgroup of its own, `{root}/gpumesh/<task>.<attempt>` (the client
writes the launcher's pid to `cgroup.procs` while the launcher waits, before it forks
anything, so every descendant is born there). The cgroup's directory and files are root's
(0755/0644): a task running as a user of its own cannot write its pid into any other cgroup's
`cgroup.procs` (the parent's, the root's), so it cannot leave; `cgroup.kill` ends it whole.
The client is a child subreaper (PR_SET_CHILD_SUBREAPER), so a task's orphans (`sleep 777 &`,
a double fork) are reparented to it rather than to PID 1.

A tree is the union of: the cgroup's `cgroup.procs`, the process group and session of the
launcher, the descendants of the wrapper, and every process whose environment carries the
marker (read from /proc/<pid>/environ with psutil; setsid'd children are found this way).
`end_tree` SIGTERMs all of them, SIGKILLs (and `cgroup.kill`s) what is left after the grace,
and returns only once none is alive; zombies that reparented to the client are reaped.

Everything here blocks (psutil scans, /proc and /sys reads): call it through asyncio.to_thread.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

MARKER_VAR = "GPUMESH_ATTEMPT"
CGROUP_DIR = "gpumesh"
KILL_WAIT_S = 10.0  # after SIGKILL, how long to wait for the kernel to take them away
POLL_S = 0.1  # between scans while a tree ends
_PR_SET_CHILD_SUBREAPER = 36


@dataclass
class Tree:
    """One attempt's processes: how to find them. `seen` grows with every scan."""

    marker: str
    cgroup: Path | None = None
    pgid: int = 0  # the launcher's pid: its process group and session
    root_pid: int = 0  # the wrapper, parent of the task's first process
    seen: set[int] = field(default_factory=set)


def marker(task_id: str, attempt: int) -> str:
    return f"{task_id}.{attempt}"


# --- the client's side: subreaper, zombies ------------------------------------------------


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux >= 3.4)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    except (OSError, AttributeError) as exc:
        log.warning("cannot become a child subreaper (%s): orphans go to PID 1, found by marker",
                    exc)
        return False
    return True


def reap_zombies(keep: set[int]) -> int:
    """Reap zombie children of this client that a task left (other sessions), not in `keep`.

    Task processes run in the launcher's session (or their own, after setsid); anything the
    client itself runs (detector tools) stays in the client's session and is left to its
    owner's wait(). `keep`: launchers whose exit asyncio still waits for.
    """
    me = os.getsid(0)
    reaped = 0
    try:
        children = psutil.Process().children()
    except psutil.Error:
        return 0
    for child in children:
        try:
            if child.pid in keep or child.status() != psutil.STATUS_ZOMBIE:
                continue
            if os.getsid(child.pid) == me:
                continue
            if os.waitpid(child.pid, os.WNOHANG)[0] == child.pid:
                reaped += 1
        except (psutil.Error, ChildProcessError, ProcessLookupError):
            continue
    return reaped


# --- cgroups ------------------------------------------------------------------------------


def cgroup_root(setting: str = "auto") -> Path | None:
    """Where per-task cgroups go: `{cgroup2 mount}{our cgroup}/gpumesh`, if we may write there.

    `setting`: "auto" (find it), "off" (use the process-group fallback), or a directory.
    """
    if setting == "off":
        return None
    try:
        base = Path(setting) if setting not in ("", "auto") else _own_cgroup2_dir()
        if base is None:
            return None
        root = base if base.name == CGROUP_DIR else base / CGROUP_DIR
        root.mkdir(exist_ok=True)
        probe = root / f"probe-{os.getpid()}"
        probe.mkdir(exist_ok=True)
        ok = (probe / "cgroup.procs").exists()
        probe.rmdir()
    except OSError as exc:
        log.info("no per-task cgroups (%s); using process groups and a subreaper", exc)
        return None
    if not ok:
        log.info("%s is not a cgroup2 hierarchy; using process groups and a subreaper", root)
        return None
    return root


def _own_cgroup2_dir() -> Path | None:
    mount = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                mount = Path(left.split()[4])
                break
    if mount is None:
        return None
    own = "/"
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                own = line[3:].strip()
    # Our own cgroup may hold processes: a child of it is fine while no controllers are on.
    return mount / own.lstrip("/")


def make_cgroup(root: Path | None, name: str) -> Path | None:
    """Create `{root}/{name}` (a leftover of a crash is emptied first); None on failure."""
    if root is None:
        return None
    path = root / name
    try:
        if path.exists():
            _kill_cgroup(path)
            _rmdir_cgroup(path, KILL_WAIT_S)
        path.mkdir()
    except OSError as exc:
        log.warning("cannot create cgroup %s (%s): falling back to the process group", path, exc)
        return None
    return path


def join_cgroup(path: Path, pid: int) -> None:
    """Move `pid` into the cgroup `path` (the client does it, as root: the task's user cannot
    write any cgroup file, so it can neither join one nor leave its own). Raises OSError."""
    (path / "cgroup.procs").write_text(str(pid))


def _cgroup_pids(path: Path) -> set[int]:
    try:
        return {int(p) for p in (path / "cgroup.procs").read_text().split()}
    except (OSError, ValueError):
        return set()


def _kill_cgroup(path: Path) -> None:
    try:
        (path / "cgroup.kill").write_text("1")  # Linux >= 5.14
    except FileNotFoundError:
        for pid in _cgroup_pids(path):
            _signal(pid, signal.SIGKILL)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("cgroup.kill of %s failed: %s", path, exc)


def _rmdir_cgroup(path: Path, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:  # EBUSY: the kernel has not taken the last one away yet
            if time.monotonic() > deadline:
                log.warning("cannot remove cgroup %s: %s", path, exc)
                return
            time.sleep(POLL_S)


# --- finding and ending a tree ------------------------------------------------------------


def scan(tree: Tree) -> set[int]:
    """The live (not zombie) processes of `tree` now; adds them to `tree.seen`."""
    found: set[int] = set()
    if tree.cgroup is not None:
        found |= _cgroup_pids(tree.cgroup)
    me = os.getpid()
    for proc in psutil.process_iter(["pid"]):
        pid = proc.pid
        if pid == me or pid in found:
            continue
        try:
            if tree.pgid and tree.pgid in (os.getpgid(pid), os.getsid(pid)):
                found.add(pid)
            elif proc.environ().get(MARKER_VAR) == tree.marker:
                found.add(pid)
        except (psutil.Error, OSError):
            continue
    if tree.root_pid:
        try:
            found |= {c.pid for c in psutil.Process(tree.root_pid).children(recursive=True)}
            found.add(tree.root_pid)
        except psutil.Error:
            pass
    alive = {pid for pid in found if _alive(pid)}
    tree.seen |= alive
    return alive


def end_tree(tree: Tree, grace_s: float, keep: set[int] | None = None) -> float:
    """SIGTERM the tree, SIGKILL it after `grace_s`; return once none of it is alive.

    Returns the seconds it took. The cgroup (if any) is removed after.
    """
    began = time.monotonic()
    alive = scan(tree)
    if alive:
        for pid in alive:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while alive and time.monotonic() < deadline:
            time.sleep(POLL_S)
            alive = scan(tree)
    if alive:
        log.info("tree %s outlived SIGTERM by %.1fs: SIGKILL to %d process(es)", tree.marker,
                 grace_s, len(alive))
        deadline = time.monotonic() + KILL_WAIT_S
        while alive and time.monotonic() < deadline:
            if tree.cgroup is not None:
                _kill_cgroup(tree.cgroup)
            for pid in alive:
                _signal(pid, signal.SIGKILL)
            time.sleep(POLL_S)
            alive = scan(tree)
        if alive:
            log.error("tree %s: %d process(es) survived SIGKILL: %s", tree.marker, len(alive),
                      sorted(alive))
    if tree.cgroup is not None:
        _rmdir_cgroup(tree.cgroup, KILL_WAIT_S)
    reap_zombies(keep or set())
    return time.monotonic() - began


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError as exc:
        log.warning("cannot signal pid %d: %s", pid, exc)


def _alive(pid: int) -> bool:
    try:
        # bool(): psutil is untyped, so mypy sees the comparison as Any
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False
