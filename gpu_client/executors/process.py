"""The `process` executor: a task's `script` or `command` as a detached process group.

Each attempt gets a directory `{work_dir}/{task_id}.{attempt}/` holding `meta.json` (task,
attempt, pid, pgid, psutil create time, start time, timeout), `output.log` (stdout and stderr
merged) and, once the command ends, `exit_code`. A short launcher shell, started with
`create_subprocess_exec` in a new session, forks the wrapper and exits at once, so the
wrapper is no child of the client: it outlives a client restart (asyncio would kill a child
whose transport is closed) and is re-adopted from its directory by the next client. Its end is
awaited through a pidfd on the event loop. The directory is deleted on `release()` (the result
was acked, or the attempt was fenced off); the output tail lives on in the coordinator.

Nothing outlives its task: every exit path (end, failure, timeout, cancel, fencing, adoption
after a client restart) ends the attempt's whole process tree (`tree.end_tree`: its cgroup
where the node has cgroup v2, else its process group, session, descendants and every process
that inherited its `GPUMESH_ATTEMPT` marker) before the outcome is returned, so the result
(and with it the task's GPUs) goes back to the coordinator only once its processes are gone.
On NVIDIA the executor then waits (bounded) until NVML lists none of them on any GPU.

Node faults are not the task's: an unusable work dir, a shell that cannot be spawned or an
ENOSPC is a `RunOutcome` with `infra=True`, which the coordinator runs elsewhere. A launch
refused because of the task's own values (exec's E2BIG, a NUL or an `=` in an env name, a
file name the file system will not hold) is an ordinary failure: it never counts towards the
node's quarantine (the coordinator refuses such tasks at submit; shared/tasks.py).
"""

from __future__ import annotations

import asyncio
import errno
import fnmatch
import logging
import os
import pwd
import re
import shutil
import stat
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpu_client.detect import GpuSource
from gpu_client.executors.base import (
    Adopted,
    OnOutput,
    OnStarted,
    RunOutcome,
    describe_exit,
    gpu_env,
)
from gpu_client.executors.journal import (
    CRASH_VAR,
    INFRA_VERDICTS,
    Journal,
    Verdict,
    crash_point,
    pid_space,
    survey,
)
from gpu_client.executors.output import Tail, file_size, read_small, read_tail
from gpu_client.executors.pids import alive, create_time, wait_pid
from gpu_client.executors.tree import (
    MARKER_VAR,
    Tree,
    become_subreaper,
    cgroup_root,
    end_tree,
    join_cgroup,
    make_cgroup,
    marker,
)
from gpu_client.executors.uids import DEFAULT_TASK_UIDS, NoFreeUid, UidPool, end_uid, owner
from gpu_client.executors.workdir import collect, write_inputs
from gpu_client.settings import ClientSettings
from shared.files import bookkeeping_problem, name_problem
from shared.policy import HOOK_ENV
from shared.protocol import Assign
from shared.tasks import MAX_ARG_STRLEN

log = logging.getLogger(__name__)

NO_EXIT_CODE = "process ended without recording an exit code"
GPU_RELEASE_WAIT_S = 10.0  # how long NVML may go on listing an ended task's processes
GPU_RELEASE_POLL_S = 0.2
DISK_FULL_BYTES = 1 << 20  # a failed attempt on a file system with less free is a node fault
# What a file system answers for a name it will not hold, in a fresh attempt dir: the task's
# file names did it (too long, not its encoding, over another file), not the node. EINVAL is
# left out: a chown to a user the node cannot map answers it too.
NAME_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EILSEQ, errno.EEXIST, errno.ENOTDIR,
                         errno.EISDIR})

# $0 is "gpumesh-task", $1 the task's cgroup dir (or ""), $2 the wrapper's script, then the
# task's argv: never interpolated into the script text. With a cgroup, the launcher waits for
# a line on stdin: the client (root) writes the launcher's pid into the cgroup's root-owned
# `cgroup.procs` first, so everything the task forks is born in it, and the task's own user
# needs (and has) no write access to any cgroup file. EOF instead (the client could not place
# it): it exits without starting anything. Then it starts the wrapper and prints its pid.
_LAUNCHER = """
cg=$1; wrapper=$2; shift 2
if [ -n "$cg" ]; then
  read -r placed || exit 112
fi
/bin/sh -c "$wrapper" gpumesh-wrap "$$" "$@" </dev/null >/dev/null 2>&1 &
echo "$!"
"""
# The wrapper ($1 the launcher's pid = the process group) records its own start (`pid`)
# before it runs the command, and the command's exit code after: both by rename, so a reader
# never sees half of one. A TERM/INT/HUP to the wrapper itself (the whole group or cgroup
# signalled, as systemd's control-group stop does) leaves `signalled`; the command gets its
# signal as usual (a caught signal is reset on exec). It outlives the client; see journal.py.
_WRAPPER = """
pg=$1; shift
trap ': >signalled' TERM INT HUP
echo "$$ $pg" >pid.tmp && mv -f pid.tmp pid || exit 111
"$@" </dev/null >>output.log 2>&1
echo $? >exit_code.tmp && mv -f exit_code.tmp exit_code
"""
LAUNCH_SETTLE_S = 5.0  # at adoption: how long a launch in flight may take to record its pid
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass
class _Attempt:
    task_id: str
    attempt: int
    dir: Path
    pid: int
    pgid: int
    tree: Tree
    cancelled: bool = False
    uid: int | None = None  # its own uid from the pool (ended whole by uid), else None


class ProcessExecutor:
    name = "process"

    def __init__(
        self,
        work_dir: Path,
        source: GpuSource,
        *,
        output_tail_bytes: int = 16 * 1024,
        kill_grace_s: float = 5.0,
        base_env: Mapping[str, str] | None = None,
        cgroup: str = "auto",
        run_as: str = "",
        journal_dir: Path | None = None,
        task_uids: tuple[int, int] | None = DEFAULT_TASK_UIDS,
    ) -> None:
        self._run_as = run_as  # MESH_RUN_AS: tasks run as this user (needs a root client)
        # A root client without MESH_RUN_AS: a uid of its own per attempt (uids.py).
        self._uids = (UidPool(*task_uids) if task_uids and not run_as and os.geteuid() == 0
                      else None)
        self._uids_seeded = False
        self._run_as_ids: tuple[int, int] | None = None
        if run_as:
            log.warning("MESH_RUN_AS=%s: every process task runs as this one user, so tasks "
                        "of different tenants on this node can read, replace and signal each "
                        "other's files and processes; unset it to give each attempt a uid of "
                        "its own (MESH_TASK_UIDS)", run_as)
        self._work_dir = work_dir
        self._source = source
        self._tail_bytes = output_tail_bytes
        self._grace = kill_grace_s
        self._base_env = dict(os.environ if base_env is None else base_env)
        if self._uids is not None and self._base_env.get("PATH"):
            # entries a task's own user cannot search (/root/.local/bin) only turn a
            # "not found" into "Permission denied": left out, once
            self._base_env["PATH"] = _searchable_path(self._base_env["PATH"])
        self._attempts: dict[tuple[str, int], _Attempt] = {}
        self._cgroup_setting = cgroup
        # Several clients may share a host (and tests do): their markers must not collide.
        self._tag = f"{zlib.crc32(str(work_dir.resolve()).encode()):08x}"
        # Launch intents (journal.py): in the state dir, one folder per work dir.
        journal_dir = journal_dir or work_dir.parent / f".{work_dir.name}.journal"
        self._journal = Journal(journal_dir / self._tag)
        self._crash_at = os.environ.get(CRASH_VAR, "")  # test hook, read once
        self._pid_space = pid_space()
        self._cgroup_root: Path | None = None
        self._cgroup_probed = False
        self._launching: set[int] = set()  # launcher pids asyncio still has to reap
        self.cleanup_s: list[float] = []  # task end -> its processes gone, per attempt (last 100)
        become_subreaper()

    async def available(self) -> bool:
        try:
            await asyncio.to_thread(self._work_dir.mkdir, parents=True, exist_ok=True)
            if self._uids is not None or self._run_as:
                await asyncio.to_thread(_guard_work_dir, self._work_dir)
        except OSError as exc:
            log.warning("process executor off: work dir %s: %s", self._work_dir, exc)
            return False
        return os.access("/bin/sh", os.X_OK) and os.access(self._work_dir, os.W_OK)

    def attempt_dir(self, task_id: str, attempt: int) -> Path:
        return self._work_dir / f"{_UNSAFE.sub('_', task_id)}.{attempt}"

    async def run(self, assign: Assign, on_started: OnStarted, on_output: OnOutput) -> RunOutcome:
        if assign.command:
            argv = list(assign.command)
        elif assign.script:
            argv = ["/bin/sh", "-c", assign.script]
        else:
            return RunOutcome(exit_code=None, error="a process task needs `script` or `command`")
        d = self.attempt_dir(assign.task_id, assign.attempt)
        name = f"{self._tag}-{d.name}"  # unique on the host: one tree, one cgroup
        meta: dict[str, Any] = {
            "task_id": assign.task_id, "attempt": assign.attempt,
            "started_at": time.time(), "timeout_s": assign.timeout_s, "marker": name,
            "pid_space": self._pid_space,  # pids below mean nothing under another
            "artifacts": assign.artifacts,  # collected after it ends, adopted or not
        }
        if failed := await self._intend(assign, d, name, meta["started_at"]):
            return failed
        try:
            if not self._uids_seeded:  # once: reads the journal
                await asyncio.to_thread(self._seed_uids)
            ids = self._task_ids(name)  # no I/O: the pool, or the MESH_RUN_AS user resolved once
        except (KeyError, NoFreeUid) as exc:  # MESH_RUN_AS names no user; the range is full
            return _infra(f"no user to run the task as on this node: {exc}")
        if ids is not None:
            meta["uid"] = ids[0]
        if failed := await self._prepare(assign, d, name, meta, ids):  # files first
            await asyncio.to_thread(self._free_uid, name)
            return failed
        crash_point(self._crash_at, "dir")
        cg = await asyncio.to_thread(make_cgroup, await self._cgroups(), name)
        meta["cgroup"] = None if cg is None else str(cg)
        env = task_env(self._base_env, assign, await asyncio.to_thread(self._source.read), d)
        env[MARKER_VAR] = name  # every process of the task inherits it: see tree.py
        launched = await self._launch(d, env, str(cg or ""), argv, ids)
        if isinstance(launched, RunOutcome):
            await asyncio.to_thread(end_tree, Tree(name, cg), self._grace, self._launching)
            await asyncio.to_thread(self._end_uid, meta.get("uid"))
            return launched
        pid, pgid = launched
        # so "started" means it runs; one hop for the pid's start time and its owner
        started, who = await asyncio.to_thread(_await_pid_record, d, pid)
        if ids is not None and who not in (ids[0], None):
            # the launcher runs as the task's user (its env, its libraries): a pid of another
            # user's process is never taken as the task's (nor signalled)
            await asyncio.to_thread(end_tree, Tree(name, cg), self._grace, self._launching)
            await asyncio.to_thread(self._end_uid, meta.get("uid"))
            return _infra(f"the task's shell reported pid {pid}, not a process of its user")
        meta.update(pid=pid, pgid=pgid, create_time=started)
        try:
            await asyncio.to_thread(self._journal.record, name, meta)
        except OSError as exc:
            log.warning("task %s: cannot record its pid in %s: %s", name, self._journal.root,
                        exc)
        att = _Attempt(assign.task_id, assign.attempt, d, pid, pgid, Tree(name, cg, pgid, pid),
                       uid=meta.get("uid") if self._uids else None)
        self._attempts[(att.task_id, att.attempt)] = att  # cancel() can reach it from now on
        log.info(
            "task %s.%d started as pid %d%s", att.task_id, att.attempt, pid,
            f" in cgroup {cg}" if cg else "", extra={"task": att.task_id, "attempt": att.attempt},
        )
        on_started()
        crash_point(self._crash_at, "started")
        return await self._follow(att, meta, on_output, offset=0)

    async def _intend(
        self, assign: Assign, d: Path, name: str, at: float
    ) -> RunOutcome | None:
        """Durably record the launch intent before anything of the attempt exists."""
        intent = {"task_id": assign.task_id, "attempt": assign.attempt, "dir": str(d),
                  "marker": name, "at": at, "pid_space": self._pid_space}
        try:
            await asyncio.to_thread(self._journal.intend, name, intent)
        except OSError as exc:
            return _infra(f"launch journal {self._journal.root} unusable on this node: {exc}")
        crash_point(self._crash_at, "intent")
        return None

    def _seed_uids(self) -> None:
        """Blocking, once: uids of attempts a previous client left stay taken; the
        MESH_RUN_AS user's ids are looked up (KeyError: no such user)."""
        if self._uids is not None:
            self._uids.seed(self._journal.uids())
        if self._run_as and self._run_as_ids is None:
            pw = pwd.getpwnam(self._run_as)
            self._run_as_ids = pw.pw_uid, pw.pw_gid
        self._uids_seeded = True

    def _task_ids(self, name: str) -> tuple[int, int] | None:
        """(uid, gid) the attempt runs as: a free one of the pool, the MESH_RUN_AS user's,
        or None (a client that is not root: its own user). No I/O (`_seed_uids` did it)."""
        if self._uids is not None:
            uid = self._uids.take(name)
            return uid, uid
        return self._run_as_ids

    def _free_uid(self, name: str) -> None:
        if self._uids is not None:
            self._uids.free(name)

    def _end_uid(self, uid: Any) -> None:
        """Blocking. End every process left under an attempt's own uid (pool uids only)."""
        if self._uids is not None and isinstance(uid, int):
            if n := end_uid(uid, self._grace):
                log.info("ended %d process(es) left under task uid %d", n, uid)

    async def _prepare(self, assign: Assign, d: Path, name: str, meta: dict[str, Any],
                       ids: tuple[int, int] | None) -> RunOutcome | None:
        """Make `d` (0700, the client's), record the attempt's metadata in the journal and
        write the task's files, then hand `d` to the task's user: one thread hop. A name the
        executor or the file system refuses fails the task (its own values); a disk or
        permission error is the node's."""
        for fname in assign.files:
            if why := name_problem(fname) or bookkeeping_problem(fname):
                return _task_fault(f"input file refused: {why}")
        try:
            await asyncio.to_thread(_prepare_dir, d, self._journal, name, meta, assign, ids)
        except _DirUnusable as exc:
            return _infra(f"work dir {self._work_dir} unusable on this node: {exc.__cause__}")
        except ValueError as exc:  # a bad name or bad base64: the coordinator let it through
            return _task_fault(f"input file refused: {exc}")
        except OSError as exc:
            if exc.errno in NAME_ERRNOS:
                name = str(exc.filename or "?").removeprefix(f"{d}/")
                return _task_fault(f"input file {name[:80]!r} refused by this node's file "
                                   f"system: {exc.strerror}")
            return _infra(f"work dir {self._work_dir} unusable on this node: {exc}")
        return None

    async def _launch(
        self, d: Path, env: dict[str, str], cg: str, argv: list[str],
        ids: tuple[int, int] | None = None,
    ) -> tuple[int, int] | RunOutcome:
        """Start the launcher shell; (wrapper pid, launcher pid = pgid) or the outcome of a
        launch that failed: the task's (its argv or env refused by exec) or the node's."""
        try:
            drop, as_user = _as_user(ids, env)
            launcher = await asyncio.create_subprocess_exec(
                *drop, "/bin/sh", "-c", _LAUNCHER, "gpumesh-task", cg, _WRAPPER, *argv, cwd=d,
                env=env, stdin=asyncio.subprocess.PIPE if cg else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True,
                **as_user,
            )
        except ValueError as exc:  # a NUL in an argument or env, `=` in an env name
            return _task_fault(f"the task's command or env cannot be passed to exec: {exc}")
        except OSError as exc:
            if exc.errno == errno.E2BIG:  # only the task's argv and env can be that large
                return _task_fault(
                    f"the task's command and env are too large for exec on this node (E2BIG: "
                    f"{MAX_ARG_STRLEN} bytes per string, {_arg_max()} in all): send large "
                    "values in `files`")
            return _infra(f"could not start the task's shell on this node: {exc}")
        except KeyError as exc:  # MESH_RUN_AS names no user
            return _infra(f"could not start the task's shell on this node: {exc}")
        self._launching.add(launcher.pid)
        if cg:
            await self._place_in_cgroup(launcher, Path(cg))
        crash_point(self._crash_at, "launched")  # the launcher runs; its pid is not read yet
        try:
            out, err = await launcher.communicate()
        finally:
            self._launching.discard(launcher.pid)
        try:
            pid = int(out.split()[0])
        except (ValueError, IndexError):
            pid = 0
        if pid:
            return pid, launcher.pid
        why = err.decode(errors="replace").strip() or f"exit code {launcher.returncode}"
        return _infra(f"could not start the task's shell on this node: {why}")

    async def _place_in_cgroup(self, launcher: asyncio.subprocess.Process, cg: Path) -> None:
        """Write the waiting launcher's pid into `cg` (as the client: root), then let it go on;
        on failure close its stdin unanswered, so it starts nothing (an infra outcome)."""
        assert launcher.stdin is not None
        try:
            await asyncio.to_thread(join_cgroup, cg, launcher.pid)
        except OSError as exc:
            log.warning("cannot place the launcher %d in cgroup %s: %s", launcher.pid, cg, exc)
        else:
            launcher.stdin.write(b"placed\n")
        try:
            await launcher.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # it died already: communicate() reports it
        launcher.stdin.close()

    async def _cgroups(self) -> Path | None:
        if not self._cgroup_probed:
            self._cgroup_probed = True
            self._cgroup_root = await asyncio.to_thread(cgroup_root, self._cgroup_setting)
            if self._cgroup_root is not None:
                log.info("process tasks run in cgroups under %s", self._cgroup_root)
        return self._cgroup_root

    async def cancel(self, task_id: str, attempt: int, grace_s: float | None = None) -> None:
        att = self._attempts.get((task_id, attempt))
        if att is None:
            return
        att.cancelled = True
        grace = self._grace if grace_s is None else grace_s
        await asyncio.to_thread(end_tree, att.tree, grace, self._launching)

    async def adopt(self) -> list[Adopted]:
        """What a previous client left: each attempt judged by `journal.decide` (running:
        re-adopted; exited: its exit code; not started or lost: an infra outcome)."""
        found = await asyncio.to_thread(survey, self._work_dir, self._journal, LAUNCH_SETTLE_S)
        adopted = []
        for s in found:
            key = (str(s.meta["task_id"]), int(s.meta["attempt"]))
            if key in self._attempts:
                continue
            if self._uids is not None and isinstance(s.meta.get("uid"), int):
                self._uids.seed([(f"{self._tag}-{s.dir.name}", s.meta["uid"])])
            running = s.verdict is Verdict.RUNNING
            adopted.append(
                Adopted(
                    task_id=key[0], attempt=key[1], running=running,
                    follow=self._follower(s.dir, s.meta, s.verdict),
                )
            )
            log.info("adopted task %s.%d (running: %s; %s)", key[0], key[1], running,
                     s.verdict, extra={"task": key[0], "attempt": key[1]})
        return adopted

    async def release(self, task_id: str, attempt: int) -> None:
        self._attempts.pop((task_id, attempt), None)
        d = self.attempt_dir(task_id, attempt)
        await asyncio.to_thread(shutil.rmtree, d, True)
        await asyncio.to_thread(self._journal.forget, f"{self._tag}-{d.name}")
        await asyncio.to_thread(self._free_uid, f"{self._tag}-{d.name}")  # its processes are gone
        root = await self._cgroups()
        if root is not None:  # gone already unless the attempt ended while no client watched
            await asyncio.to_thread(_rmdir_quietly, root / f"{self._tag}-{d.name}")

    def _follower(
        self, d: Path, meta: dict[str, Any], verdict: Verdict
    ) -> Callable[[OnOutput], Awaitable[RunOutcome]]:
        async def follow(on_output: OnOutput) -> RunOutcome:
            uid = meta.get("uid") if self._uids is not None else None
            att = _Attempt(str(meta["task_id"]), int(meta["attempt"]), d,
                           int(meta["pid"]), int(meta["pgid"]), _tree_of(meta),
                           uid=uid if isinstance(uid, int) else None)
            if verdict in INFRA_VERDICTS:  # the node lost it: what it left goes, then rerun
                await self._end(att)
                output = await asyncio.to_thread(read_tail, d / "output.log", self._tail_bytes)
                return _infra(_lost_reason(verdict, d), output)
            if verdict is Verdict.EXITED:  # it ended while no client watched
                await self._end(att)
                return await asyncio.to_thread(self._read_outcome, d, meta, "")
            offset = await asyncio.to_thread(file_size, d / "output.log")
            return await self._follow(att, meta, on_output, offset=offset)

        return follow

    async def _follow(
        self, att: _Attempt, meta: dict[str, Any], on_output: OnOutput, *, offset: int
    ) -> RunOutcome:
        """Wait for the wrapper to end (or time out), streaming output.log meanwhile."""
        key = (att.task_id, att.attempt)
        self._attempts[key] = att
        timeout_s = meta.get("timeout_s")
        left = None if timeout_s is None else timeout_s - (time.time() - meta["started_at"])
        tail = Tail(att.dir / "output.log", offset, on_output)
        tail_task = asyncio.create_task(tail.loop())
        error = ""
        try:
            try:
                async with asyncio.timeout(None if left is None else max(left, 0.0)):
                    await wait_pid(att.pid)
            except TimeoutError:
                error = f"timed out after {timeout_s:g}s"
                log.info("task %s.%d %s: stopping its processes", att.task_id, att.attempt,
                         error, extra={"task": att.task_id, "attempt": att.attempt})
                await asyncio.to_thread(end_tree, att.tree, self._grace, self._launching)
                await wait_pid(att.pid)
        finally:
            tail_task.cancel()
            if self._attempts.get(key) is att:
                del self._attempts[key]
        await self._end(att)  # nothing it started outlives it, whatever way it ended
        await tail.read_once()
        if att.cancelled:
            error = "cancelled"
        return await asyncio.to_thread(self._read_outcome, att.dir, meta, error)

    async def _end(self, att: _Attempt) -> None:
        """End what is left of the attempt's tree, then wait for NVML to let go of it."""
        took = await asyncio.to_thread(end_tree, att.tree, self._grace, self._launching)
        began = time.monotonic()
        await asyncio.to_thread(self._end_uid, att.uid)  # whatever left its tree: same uid
        took += time.monotonic() - began
        took += await self._wait_gpus_released(att.tree)
        self.cleanup_s = [*self.cleanup_s[-99:], took]
        log.info("task %s.%d: its processes are gone %.3fs after its end", att.task_id,
                 att.attempt, took, extra={"task": att.task_id, "attempt": att.attempt})

    async def _wait_gpus_released(self, tree: Tree) -> float:
        """Seconds spent waiting until no GPU lists a process of `tree` (NVIDIA only)."""
        listed = getattr(self._source, "compute_pids", None)
        if listed is None or not tree.seen:
            return 0.0
        began = time.monotonic()
        deadline = began + GPU_RELEASE_WAIT_S
        while tree.seen & await asyncio.to_thread(listed):
            if time.monotonic() > deadline:
                log.warning("task %s: NVML still lists its processes after %gs; going on",
                            tree.marker, GPU_RELEASE_WAIT_S)
                break
            await asyncio.sleep(GPU_RELEASE_POLL_S)
        return time.monotonic() - began

    def _read_outcome(self, d: Path, meta: dict[str, Any], error: str) -> RunOutcome:
        """Blocking: the exit code and output tail from an attempt's directory."""
        output = read_tail(d / "output.log", self._tail_bytes)
        duration = round(max(0.0, _mtime(d / "exit_code") - meta["started_at"]), 3)
        try:
            exit_code: int | None = int(read_small(d / "exit_code").strip())
        except (OSError, ValueError):
            exit_code = None
        if not error:
            if exit_code is None and not (d / "pid").exists():  # the wrapper could not start
                return _infra(f"not started: could not record its start in {d}", output)
            if exit_code is None:
                error = NO_EXIT_CODE
            elif exit_code != 0:
                error = describe_exit(exit_code)
        elif exit_code is None:
            duration = round(time.time() - meta["started_at"], 3)
        infra = bool(error) and error != "cancelled" and _disk_full(d)
        if infra:
            error = f"no space left in work dir {self._work_dir} on this node ({error})"
        found = collect(d, meta.get("artifacts") or []) if error != "cancelled" else None
        return RunOutcome(
            exit_code=exit_code, output=output, duration_s=duration, error=error, infra=infra,
            artifacts=found,
        )


def _infra(error: str, output: str = "") -> RunOutcome:
    """A node fault (work dir, shell, disk, a client restart that lost the attempt): the
    coordinator runs the attempt again without spending its max_attempts."""
    log.warning("infrastructure error: %s", error)
    return RunOutcome(exit_code=None, output=output, error=error, infra=True)


def _task_fault(error: str) -> RunOutcome:
    """A launch refused because of the task's own values (its argv, env or file names):
    an ordinary failure that spends an attempt, never a node fault (no quarantine)."""
    log.info("task refused at launch: %s", error)
    return RunOutcome(exit_code=None, error=error)


def _arg_max() -> int | str:
    """This node's ARG_MAX (a quarter of the stack limit), or "?" where it cannot be read."""
    try:
        return os.sysconf("SC_ARG_MAX")
    except (ValueError, OSError):
        return "?"


def _lost_reason(verdict: Verdict, d: Path) -> str:
    if verdict is Verdict.NOT_STARTED:
        return "not started: the client restarted before the task's command ran"
    if verdict is Verdict.GONE:
        return (f"not started or lost with the client: its work dir {d} does not exist (the "
                "client died before making it, or it went with the client's container)")
    if verdict is Verdict.KILLED:
        return ("killed with the client: a signal to its whole process group or cgroup "
                "(a supervisor stopping the client with its tasks) ended it")
    return ("lost with the client: its processes ended with the client (same cgroup or "
            "container) before recording an exit code")


def _tree_of(meta: dict[str, Any]) -> Tree:
    name = str(meta.get("marker") or marker(str(meta["task_id"]), int(meta["attempt"])))
    # (no marker: written by a client before markers; its pgid and session still find it)
    cg = meta.get("cgroup")
    pgid, pid = int(meta.get("pgid") or 0), int(meta.get("pid") or 0)
    return Tree(name, Path(cg) if cg else None, pgid, pid)


_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_KEPT_VARS = ("PATH", "LANG", "LC_ALL", "TZ")  # all a task gets of the client's environment


def task_env(
    base: Mapping[str, str], assign: Assign, gpus: list[Any], home: Path | None = None
) -> dict[str, str]:
    """A clean environment: PATH, LANG, LC_ALL and TZ from the client, HOME = the task's work
    dir, the task's env, then its GPU visibility vars. Nothing else of the client's (its
    secrets, its MESH_* settings, its GPU masks) reaches the task."""
    env = {k: base[k] for k in _KEPT_VARS if base.get(k)}
    env.setdefault("PATH", _DEFAULT_PATH)
    env.setdefault("LANG", "C.UTF-8")
    if home is not None:
        env["HOME"] = str(home)
    env.update(assign.env)
    env.update(gpu_env(assign, gpus))
    return env


# --- blocking helpers: call through asyncio.to_thread -----------------------------------


class _DirUnusable(Exception):
    """The work dir or the journal failed (the node's fault); the OSError is its cause."""


def _prepare_dir(d: Path, journal: Journal, name: str, meta: dict[str, Any], assign: Assign,
                 ids: tuple[int, int] | None) -> None:
    """Make the attempt's dir (0700, the client's: no task can enter it yet), record its
    metadata (with its uid) in the journal, where only the client writes, before anything of
    the task runs, then write its files and hand the dir to `ids` last (workdir.py)."""
    try:
        if os.path.lexists(d):
            shutil.rmtree(d)  # a leftover of a crash before this attempt was ever reported
        d.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(d, 0o700)
        journal.record(name, meta)
    except OSError as exc:
        raise _DirUnusable from exc
    write_inputs(d, assign.files, ids)


def _guard_work_dir(work_dir: Path) -> None:
    """Tasks run as other users: the work dir must be the client's alone to write (else a
    task could plant a next attempt's dir), and 0711: a task reaches its own dir by path
    but cannot list the others'. OSError (refused) otherwise."""
    st = os.lstat(work_dir)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise PermissionError(errno.EPERM, "not a directory owned by the client's user "
                              f"(uid {os.geteuid()}): tasks could plant files in it")
    os.chmod(work_dir, 0o711)


def _searchable_path(value: str) -> str:
    """The entries of a PATH value that any user can search (o+x on every component)."""
    def searchable(entry: str) -> bool:
        p = Path(entry)
        if not p.is_absolute():
            return False
        try:
            return all(os.stat(q).st_mode & 0o001 for q in (p, *p.parents))
        except OSError:
            return False
    return ":".join(e for e in value.split(":") if searchable(e)) or _DEFAULT_PATH


_SETPRIV = shutil.which("setpriv", path="/usr/bin:/bin:/usr/sbin:/sbin")


def _as_user(ids: tuple[int, int] | None, env: dict[str, str]) -> tuple[list[str], dict[str, Any]]:
    """How the launcher starts as `ids` (numeric: no passwd entry is needed) with no
    supplementary groups (none of root's): a command prefix, or subprocess arguments.

    `setpriv` (util-linux) switches in the exec chain, so the client spawns with vfork: a
    fork of the whole client for `user=` costs milliseconds per launch. setpriv runs as root
    for one exec with the task's env, so every name that steers a loader or an interpreter
    (shared/policy.py HOOK_ENV: the node refuses a task that sets one) is dropped again here.
    Without setpriv: subprocess's own switch (a fork)."""
    if ids is None:
        return [], {}
    if _SETPRIV is None:
        return [], {"user": ids[0], "group": ids[1], "extra_groups": []}
    for name in [n for n in env if any(fnmatch.fnmatchcase(n, p) for p in HOOK_ENV)]:
        del env[name]
    return [_SETPRIV, f"--reuid={ids[0]}", f"--regid={ids[1]}", "--clear-groups", "--"], {}


def _await_pid_record(d: Path, pid: int) -> tuple[float | None, int | None]:
    """The wrapper's start time and real uid; then wait (bounded) until it has recorded its
    start, or has ended without."""
    started, who = create_time(pid), owner(pid)
    deadline = time.monotonic() + LAUNCH_SETTLE_S
    while not (d / "pid").exists() and time.monotonic() < deadline:
        if not alive(pid):
            break
        time.sleep(0.002)
    return started, who


def _rmdir_quietly(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _disk_full(d: Path) -> bool:
    """Did the attempt's file system run out of space (ENOSPC)? Then the node failed it."""
    try:
        st = os.statvfs(d)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < DISK_FULL_BYTES


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return time.time()


def create(settings: ClientSettings, source: GpuSource) -> ProcessExecutor:
    return ProcessExecutor(settings.work_dir, source, output_tail_bytes=settings.output_tail_bytes,
                           cgroup=settings.cgroup, run_as=settings.run_as,
                           task_uids=settings.task_uids,
                           journal_dir=settings.state_dir.expanduser() / "journal")
