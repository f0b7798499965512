"""The launch journal: what a process-executor attempt had reached when its client died.

A client can die at any point of a launch (`kill -9` of its process group, `systemctl
restart` with the default KillMode, a container restart). These records, each written
atomically (a temp file renamed over the name, or an empty file), say how far it got:

- the **intent**, `{state_dir}/journal/{tag}/{name}.json` ({task_id, attempt, dir, marker,
  at, pid_space}), written and fsync'd (file and directory) by the client before anything of the
  attempt exists; removed by `release()` once the coordinator has the result (or fenced
  the attempt off). An intent with no work dir is an attempt that never started.
- `pid` in the attempt's work dir ("<wrapper pid> <launcher pid = pgid>"), written by the
  wrapper itself before it runs the task's command: no `pid`, the command never ran. Pids
  count only under the same `pid_space` (boot and pid namespace) as the intent's.
- `exit_code` in the work dir, written by the wrapper once the command ended. The wrapper
  is no child of the client (the launcher's own session, reparented on the launcher's exit),
  so a task that ends while no client watches still records its exit code and output.
- `signalled` in the work dir: the wrapper itself got TERM, INT or HUP, i.e. the signal
  went to the whole process group or cgroup (systemd stopping the unit with the default
  KillMode), not just to the task's command.

`decide()` turns what a restarted client finds into one verdict; see its table.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from gpu_client.credential import private_dirs
from gpu_client.executors.output import read_small
from gpu_client.executors.pids import pid_is
from gpu_client.executors.tree import MARKER_VAR, Tree, marker, scan
from gpu_client.executors.uids import owner
from shared.durable import fsync_dir

log = logging.getLogger(__name__)

CRASH_VAR = "GPUMESH_TEST_CRASH_AT"  # test hook: die with the process group at that point
CRASH_POINTS = ("intent", "dir", "launched", "started")


class Verdict(StrEnum):
    EXITED = "exited"  # report the exit code it recorded (and its output)
    RUNNING = "running"  # re-adopt: follow it to its end
    NOT_STARTED = "not started"  # infra: its command never ran; run it again
    LOST = "lost with the client"  # infra: it ran, but ended with no exit code recorded
    GONE = "work dir gone"  # infra: the intent is there, its work dir is not
    KILLED = "killed with the client"  # infra: its whole group was signalled, it answered


INFRA_VERDICTS = frozenset({Verdict.NOT_STARTED, Verdict.LOST, Verdict.GONE, Verdict.KILLED})
SETTLE_POLL_S = 0.05


@dataclass(frozen=True)
class Found:
    """What a restarted client sees of one attempt (all read from disk and /proc)."""

    dir_exists: bool
    exit_code: bool  # `exit_code` is in the work dir
    pid_record: bool  # `pid` is in the work dir
    wrapper_alive: bool  # the recorded wrapper pid is alive and carries the attempt's marker
    signalled: bool = False  # `signalled`: the wrapper itself was sent TERM, INT or HUP


def decide(found: Found) -> Verdict:
    """The decision table, in the order it is checked (first match wins):

    | work dir | exit_code | signalled | pid | wrapper alive | verdict     | reported as         |
    |----------|-----------|-----------|-----|---------------|-------------|---------------------|
    | missing  | -         | -         | -   | -             | GONE        | infra: run it again |
    | yes      | yes       | yes       | -   | -             | KILLED      | infra: run it again |
    | yes      | yes       | no        | -   | -             | EXITED      | its exit code, output |
    | yes      | no        | -         | yes | yes           | RUNNING     | re-adopted          |
    | yes      | no        | -         | yes | no            | LOST        | infra: run it again |
    | yes      | no        | -         | no  | -             | NOT_STARTED | infra: run it again |

    The wrapper writes `pid` before it runs the command and `exit_code` after, so "no pid"
    means the command never ran, and "pid, no exit code, no wrapper" means the wrapper was
    killed with the client (same cgroup, same container) or by someone else; never the
    task's own end, which always leaves an exit code. An exit code with `signalled` is the
    command's answer to a signal sent to its whole group while no client watched (systemd's
    control-group stop of the client): the node's doing, not the task's. Before deciding,
    the caller lets a launch still in flight (processes with the marker, no `pid`) settle.
    """
    if not found.dir_exists:
        return Verdict.GONE
    if found.exit_code:
        return Verdict.KILLED if found.signalled else Verdict.EXITED
    if found.pid_record:
        return Verdict.RUNNING if found.wrapper_alive else Verdict.LOST
    return Verdict.NOT_STARTED


class Journal:
    """Intent records of one executor (one work dir): `{root}/{name}.json`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def intend(self, name: str, entry: dict[str, Any]) -> None:
        """Blocking. Durably record the intent to launch `name` (fsync file and dir)."""
        private_dirs(self.root)  # in the state dir: the client's alone (0700, files 0600)
        final = self.path(name)
        tmp = final.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(json.dumps(entry))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(final)
        fsync_dir(self.root)

    def record(self, name: str, meta: dict[str, Any]) -> None:
        """Blocking. The attempt's metadata (pid, pgid, create time, uid, timeout, ...): kept
        here, where only the client can write, never in the task's work dir."""
        final = self.root / f"{name}.meta"
        tmp = self.root / f"{name}.meta.tmp"
        tmp.unlink(missing_ok=True)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(json.dumps(meta))
        tmp.replace(final)

    def meta(self, name: str) -> dict[str, Any] | None:
        """Blocking. What `record` wrote for `name`, or None."""
        try:
            meta = json.loads((self.root / f"{name}.meta").read_text())
            str(meta["task_id"]), int(meta["attempt"]), float(meta["started_at"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return meta if isinstance(meta, dict) else None

    def uids(self) -> list[tuple[str, int]]:
        """Blocking. (name, uid) of every attempt recorded here with a uid of its own."""
        out = []
        try:
            paths = sorted(self.root.glob("*.meta"))
        except OSError:
            return []
        for path in paths:
            meta = self.meta(path.name.removesuffix(".meta"))
            if meta is not None and isinstance(meta.get("uid"), int):
                out.append((path.name.removesuffix(".meta"), int(meta["uid"])))
        return out

    def forget(self, name: str) -> None:
        """Blocking. The attempt is settled with the coordinator: drop its intent."""
        for path in (self.path(name), self.root / f"{name}.meta"):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def entries(self) -> list[dict[str, Any]]:
        """Blocking. Every readable intent; unreadable ones are logged and skipped."""
        found = []
        try:
            paths = sorted(self.root.glob("*.json"))
        except OSError:
            return []
        for path in paths:
            try:
                entry = json.loads(path.read_text())
                str(entry["task_id"]), int(entry["attempt"]), str(entry["dir"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring unreadable launch journal entry %s: %s", path, exc)
                continue
            found.append(entry)
        return found


def crash_point(wanted: str, point: str) -> None:
    """Test hook: with GPUMESH_TEST_CRASH_AT=<point> (read once, at executor creation), die
    here with the whole process group, as `kill -9 -PGID` or `systemctl restart` would."""
    if wanted and wanted == point:
        log.warning("%s=%s: killing this client's process group now", CRASH_VAR, point)
        os.killpg(os.getpgrp(), signal.SIGKILL)


# --- after a restart: what each attempt had reached (blocking: call via asyncio.to_thread) --


@dataclass
class Survey:
    dir: Path
    meta: dict[str, Any]  # task_id, attempt, started_at, marker, pid, pgid, ...
    verdict: Verdict


def survey(work_dir: Path, journal: Journal, settle_s: float) -> list[Survey]:
    """Every attempt a previous client left: each launch intent, and each work dir with a
    `meta.json` (a client from before the journal wrote no intent), judged by `decide`."""
    dirs = {d.name: (d, meta) for d, meta in scan_work_dir(work_dir)}
    out = []
    for entry in journal.entries():
        d = Path(entry["dir"])
        _, meta = dirs.pop(d.name, (d, None))
        meta = journal.meta(str(entry.get("marker") or "")) or meta
        if meta is None:  # the client died before (or while) it wrote meta.json
            meta = {"task_id": entry["task_id"], "attempt": entry["attempt"],
                    "started_at": float(entry.get("at") or time.time()),
                    "marker": entry.get("marker"), "timeout_s": None,
                    "pid_space": entry.get("pid_space")}
        out.append(judge(d, meta, settle_s))
    out.extend(judge(d, meta, settle_s) for d, meta in dirs.values())
    return out


def judge(d: Path, meta: dict[str, Any], settle_s: float) -> Survey:
    """Read what the attempt in `d` left (after letting a launch in flight settle)."""
    name = str(meta.get("marker") or marker(str(meta["task_id"]), int(meta["attempt"])))
    if d.is_dir() and not (d / "pid").exists() and not (d / "exit_code").exists():
        _settle(d, name, settle_s)
    try:
        pid, pgid = map(int, read_small(d / "pid").split())
    except (OSError, ValueError):
        pid, pgid = 0, 0
    recorded = bool(pid)
    uid = meta.get("uid")
    if pid and isinstance(uid, int) and owner(pid) != uid:
        # The wrapper runs as the attempt's own uid, which can rewrite `pid`: a pid of a
        # process of another user is a forgery (or long gone), never signalled.
        log.warning("attempt %s: its pid record names pid %d, not a process of uid %d: "
                    "ignored", name, pid, uid)
        pid = pgid = 0
    elif pid and isinstance(uid, int):
        try:
            pgid = os.getpgid(pid)  # the kernel's answer, not the file's
        except OSError:
            pgid = 0
    here = pid_space()
    if (meta.get("pid_space") or here) != here:
        # Another boot or another container's pid namespace: these numbers now name other
        # processes. Nothing of the attempt can be alive; its tree is found by marker only.
        pid = pgid = 0
    if pid and meta.get("pid") != pid:
        meta.pop("create_time", None)  # that was of another process: the marker decides
    meta["pid"], meta["pgid"] = pid, pgid
    alive = bool(pid) and pid_is(pid, meta.get("create_time"), pgid, MARKER_VAR, name)
    found = Found(dir_exists=d.is_dir(), exit_code=(d / "exit_code").exists(),
                  pid_record=recorded, wrapper_alive=alive,
                  signalled=(d / "signalled").exists())
    return Survey(d, meta, decide(found))


def _own(path: Path, uid: int) -> bool:
    st = os.lstat(path)
    return st.st_uid == uid and not st.st_mode & 0o022


def pid_space() -> str:
    """Which pid numbering this process sees: the boot, and the pid namespace (a container
    restart gets a new one). Pids recorded under another are meaningless here."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def _settle(d: Path, name: str, settle_s: float) -> None:
    """A launch may still be in flight (the launcher and wrapper outlive the client): wait,
    bounded, until it records its pid or none of its processes is left."""
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline:
        if (d / "pid").exists() or not scan(Tree(name)):
            return
        time.sleep(SETTLE_POLL_S)
    log.warning("attempt %s: processes with its marker but no pid record after %gs", name,
                settle_s)


def scan_work_dir(work_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """`meta.json` of work dirs a client from before the journal wrote. One in a directory
    the client does not own (a task's, handed to its uid) is the task's writing: ignored."""
    found = []
    me = os.geteuid()
    for meta_path in sorted(work_dir.glob("*/meta.json")):
        try:
            if not all(_own(p, me) for p in (meta_path.parent, meta_path)):
                log.warning("ignoring %s: not written by this client's user", meta_path)
                continue
            meta = json.loads(meta_path.read_text())
            str(meta["task_id"]), int(meta["attempt"]), float(meta["started_at"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable %s: %s", meta_path, exc)
            continue
        found.append((meta_path.parent, meta))
    return found
