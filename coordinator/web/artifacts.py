"""Task artifacts on the coordinator: uploaded by nodes, kept on disk, served to their tenant.

`PUT /nodes/{node}/tasks/{task}/{attempt}/artifacts/{name}` (the node's credential as bearer):
taken only while that attempt is the task's current one on that node (fenced like a result),
streamed to a staging file (`<data-dir>/artifacts/.incoming/`), fsynced, renamed to
`<data-dir>/artifacts/<task>/<attempt>/<name>`, the directory fsynced; only then the answer
(name, size, sha256) and the entry in the ledger of what this coordinator stored for that
attempt. The node sends its result after every upload answered, and the result it sends lists
them; the Mesh records only the names the ledger holds for that attempt, with the ledger's own
size and sha256 (`ArtifactFiles.vet`, handed to the core as a callback by coordinator/web/app.py):
any other name a node lists is left out of the record, logged, and said in `artifacts_cut`, and
the rest of the result stands.

Bounds, counted as bytes are written (a reservation taken before streaming, grown with each
chunk, released on failure; uploads in flight count, and no name is exempt): per attempt at
most MAX_ARTIFACT_FILES files of MAX_ARTIFACT_BYTES each and MAX_ARTIFACTS_TOTAL in all (413),
and `MESH_ARTIFACTS_MAX_BYTES` for everything under `<data-dir>/artifacts/` (507 when full).
At start the tree is read once: staged and legacy partial files are removed, the bytes on disk
counted, and the ledger of every placed task's current attempt rebuilt (sha256 read back).

`GET /tasks/{id}/artifacts/{name}` serves one to whoever may read the task (tenant scoping as
`GET /tasks/{id}`), from the attempt the result names: the name must pass the upload rule, and
the file is opened component by component from the artifacts root with `O_NOFOLLOW` (a
symlink anywhere, or anything but a regular file, is 404). Files survive a restart (they are
on disk; the result row names them). The sweeper deletes a finished task's artifacts
`MESH_ARTIFACT_RETENTION_S` after it finished (then 410 Gone), and uploads of attempts the
result does not name (fenced ones) once the task finished. With PostgreSQL the files stay on
the disk of the coordinator that took them (README, Limits).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import secrets
import shutil
import stat
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import quote

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from coordinator.access.auth import principal_of
from coordinator.core.mesh import Mesh
from coordinator.link.identity import NodeIdentities
from coordinator.model import ACTIVE, FINISHED
from coordinator.web.api import JSON, error
from shared.durable import fsync_dir
from shared.files import (
    MAX_ARTIFACT_BYTES,
    MAX_ARTIFACT_FILES,
    MAX_ARTIFACTS_TOTAL,
    ArtifactRef,
    name_problem,
)
from shared.protocol import TaskOutcome, valid_node_name

log = logging.getLogger(__name__)

FLUSH_BYTES = 1 << 20  # body bytes buffered before one write on a worker thread
READ_BYTES = 1 << 20  # one read of a download on a worker thread
INCOMING = ".incoming"  # staging dir under the root: no task id starts with a dot
LEGACY_PART = re.compile(r"\.part-[0-9a-f]{8}\Z")  # staged beside the artifact before issue 25
MAX_NOTES = 8  # refused names a result's `artifacts_cut` spells out; the rest are counted


@dataclass(eq=False)
class _Attempt:
    """One attempt's directory as this coordinator knows it: the ledger of what it stored
    there (name → (size, sha256), each on disk and fsynced) and what uploads in flight hold."""

    stored: dict[str, tuple[int, str]] = field(default_factory=dict)
    on_disk: int = 0  # bytes of the stored files
    reserved: int = 0  # bytes taken by uploads in flight
    incoming: Counter[str] = field(default_factory=Counter)  # names in flight
    finishing: asyncio.Lock = field(default_factory=asyncio.Lock)  # renames, one at a time

    def files(self) -> int:
        """Distinct names stored or in flight: what MAX_ARTIFACT_FILES bounds."""
        return len(self.stored) + sum(1 for n in self.incoming if n not in self.stored)


class ArtifactFiles:
    """The artifacts directory, its ledger, its bounds and its sweeper. Blocking file work
    goes to threads; the ledger and the byte counts change on the event loop only."""

    def __init__(self, root: Path, mesh: Mesh, retention_s: float, max_bytes: int) -> None:
        self.root, self.mesh, self.retention_s, self.max_bytes = root, mesh, retention_s, max_bytes
        self.staging = root / INCOMING
        self._ledger: dict[str, dict[str, _Attempt]] = {}  # task → attempt → its directory
        self.used = 0  # bytes on disk under root, plus those reserved by uploads in flight
        self._sweeper: asyncio.Task[None] | None = None
        self.swept = 0  # task directories deleted so far (tests wait on it)

    def attempt_dir(self, task_id: str, attempt: int) -> Path:
        return self.root / task_id / str(attempt)

    async def start(self) -> None:
        """Read the tree once, before any node can connect (the Mesh has loaded its placed
        tasks): partial uploads removed, bytes counted, the ledger of each placed task's
        current attempt read back. Then sweep on."""
        current = {t.id: str(t.attempt) for t in self.mesh.tasks.values() if t.state in ACTIVE}
        ledger, self.used, removed = await asyncio.to_thread(
            _scan, self.root, self.staging, current)
        for task_id, attempts in ledger.items():
            for attempt, stored in attempts.items():
                self._ledger.setdefault(task_id, {})[attempt] = _Attempt(
                    stored=stored, on_disk=sum(size for size, _ in stored.values()))
        if removed:
            log.warning("removed %d partial artifact uploads an earlier run left", removed)
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="artifact-sweeper")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)

    def claim(self, task_id: str, attempt: int, name: str) -> _Claim | str:
        """A claim on the attempt's bounds for one upload of `name`, or why there is no room
        for one more file."""
        at = self._ledger.setdefault(task_id, {}).setdefault(str(attempt), _Attempt())
        if name not in at.stored and name not in at.incoming and at.files() >= MAX_ARTIFACT_FILES:
            return f"an attempt keeps at most {MAX_ARTIFACT_FILES} artifacts"
        return _Claim(self, at, name)

    def vet(self, task_id: str, attempt: int, outcome: TaskOutcome) -> TaskOutcome:
        """A node's result as the Mesh records it: its artifact list cut to the names this
        coordinator stored for that attempt (the upload name rule holds for each), with the
        ledger's own size and sha256. Any other name is left out, said in `artifacts_cut`
        and logged once for the result; the rest of the result stands. On the event loop."""
        if not outcome.artifacts:
            return outcome
        at = self._ledger.get(task_id, {}).get(str(attempt))
        stored = at.stored if at is not None else {}
        kept: list[ArtifactRef] = []
        refused: list[str] = []
        seen: set[str] = set()
        for ref in outcome.artifacts:
            if ref.name in seen:
                continue
            seen.add(ref.name)
            why = name_problem(ref.name, "artifact name")
            if why is None and ref.name not in stored:
                why = f"artifact {ref.name!r}: not stored on the coordinator for this attempt"
            if why is not None:
                refused.append(why)
                continue
            size, digest = stored[ref.name]
            kept.append(ArtifactRef(name=ref.name, size=size, sha256=digest))
        if refused:
            log.warning("task %s.%d: result names %d artifacts not stored for it, left out: %s",
                        task_id, attempt, len(refused), "; ".join(refused[:3]),
                        extra={"task": task_id, "attempt": attempt, "cause": "artifacts"})
            more = len(refused) - MAX_NOTES
            refused = refused[:MAX_NOTES] + ([f"... and {more} more"] if more > 0 else [])
        return msgspec.structs.replace(
            outcome, artifacts=kept, artifacts_cut=[*outcome.artifacts_cut, *refused])

    async def _sweep_loop(self) -> None:
        interval = min(600.0, max(0.05, self.retention_s / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep(time.time())
            except Exception:  # the one catch-all of this loop: keep sweeping
                log.exception("artifact sweep failed")

    async def sweep(self, now: float) -> int:
        """Delete what retention no longer keeps; returns the task directories deleted."""
        names = await asyncio.to_thread(_listdir, self.root)
        gone = 0
        for task_id in names:
            if task_id.startswith(".") or task_id in self.mesh.tasks:
                continue  # staging, or unfinished: its uploads may be the result's soon
            t = await self.mesh.store.get(task_id)
            if t is not None and t.state not in FINISHED:
                continue
            self._ledger.pop(task_id, None)  # its result is recorded: no more to check
            if t is None or (t.finished_at or 0) + self.retention_s <= now:
                self._freed(await asyncio.to_thread(_remove, self.root / task_id))
                gone += 1
                continue
            keep = str(t.attempt) if (t.result or {}).get("artifacts") else None
            for attempt in await asyncio.to_thread(_listdir, self.root / task_id):
                if attempt != keep:  # a fenced attempt's uploads, or none were named
                    self._freed(await asyncio.to_thread(_remove, self.root / task_id / attempt))
        self.swept += gone
        return gone

    def _freed(self, size: int) -> None:
        # An upload that lands in a directory while the sweeper deletes it (its task ended
        # during the upload) may stay counted: an over-count, undone at the next start.
        self.used = max(0, self.used - size)


class _Claim:
    """One upload's hold on its attempt's bounds and the data dir's, grown as bytes arrive,
    turned into a ledger entry when the file is in place, or released."""

    def __init__(self, files: ArtifactFiles, at: _Attempt, name: str) -> None:
        self.files, self.at, self.name, self.taken, self.held = files, at, name, 0, True
        at.incoming[name] += 1

    def grow(self, size: int) -> Response | None:
        """Hold `size` bytes in all, or the refusal of a bound it would pass."""
        more = size - self.taken
        if more <= 0:
            return None
        if size > MAX_ARTIFACT_BYTES:
            return error(413, "artifact too large", f"over {MAX_ARTIFACT_BYTES} bytes per artifact")
        at, files = self.at, self.files
        if at.on_disk + at.reserved + more > MAX_ARTIFACTS_TOTAL:
            return error(413, "too many artifacts",
                         f"an attempt keeps at most {MAX_ARTIFACTS_TOTAL} bytes of artifacts")
        if files.used + more > files.max_bytes:
            return error(507, "artifact storage full",
                         f"this coordinator keeps at most {files.max_bytes} bytes of artifacts "
                         "(MESH_ARTIFACTS_MAX_BYTES); retention (MESH_ARTIFACT_RETENTION_S) "
                         "frees space as tasks age")
        at.reserved += more
        files.used += more
        self.taken = size
        return None

    def commit(self, size: int, digest: str) -> None:
        """The file is in place (renamed over any earlier copy): into the ledger."""
        old = self.at.stored.get(self.name, (0, ""))[0]
        self.at.stored[self.name] = (size, digest)
        self.at.on_disk += size - old
        self.files.used += size - old
        self.release()

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        self.at.reserved -= self.taken
        self.files.used -= self.taken
        self.at.incoming[self.name] -= 1
        if self.at.incoming[self.name] <= 0:
            del self.at.incoming[self.name]


def _scan(
    root: Path, staging: Path, current: dict[str, str]
) -> tuple[dict[str, dict[str, dict[str, tuple[int, str]]]], int, int]:
    """Blocking, at start: remove partial uploads (the staging dir's, and `<name>.part-<hex>`
    beside an artifact, as uploads were staged before), count the bytes of every stored file,
    and read back (size, sha256) of the files of each placed task's current attempt (`current`:
    task → attempt). Returns (that ledger, the bytes, the partial files removed)."""
    removed = len(_listdir(staging))
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700, parents=True, exist_ok=True)
    ledger: dict[str, dict[str, dict[str, tuple[int, str]]]] = {}
    total = 0
    for task_id in _listdir(root):
        if task_id.startswith("."):
            continue
        top = root / task_id
        for dirpath, _, names in os.walk(top):  # symlinked directories are not entered
            for n in names:
                full = Path(dirpath) / n
                try:
                    st = full.lstat()
                    if not stat.S_ISREG(st.st_mode):
                        continue  # never written here, never served
                    if LEGACY_PART.search(n):
                        full.unlink()
                        removed += 1
                        continue
                    total += st.st_size
                    attempt, _, name = full.relative_to(top).as_posix().partition("/")
                    if current.get(task_id) == attempt and name and not name_problem(name):
                        ledger.setdefault(task_id, {}).setdefault(attempt, {})[name] = (
                            st.st_size, _sha256_of(full))
                except OSError as exc:
                    log.warning("artifact %s not read at start: %s", full, exc)
    return ledger, total, removed


def _sha256_of(path: Path) -> str:
    sha = hashlib.sha256()
    with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
        while chunk := f.read(READ_BYTES):
            sha.update(chunk)
    return sha.hexdigest()


def _remove(path: Path) -> int:
    """Blocking: delete a directory tree; returns the bytes of the files it held."""
    freed = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                freed += st.st_size
    shutil.rmtree(path, ignore_errors=True)
    return freed


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def _files(request: Request) -> ArtifactFiles:
    files: ArtifactFiles = request.app.state.artifacts
    return files


# --- PUT: a node uploads -------------------------------------------------------------------


async def upload(request: Request) -> Response:
    p = request.path_params
    node, task_id, name = p["node"], p["task_id"], p["name"]
    if not valid_node_name(node) or not p["attempt"].isdigit():
        return error(404, "not found", f"PUT {request.url.path}")
    attempt = int(p["attempt"])
    ids: NodeIdentities = request.app.state.identities
    given = request.headers.get("authorization", "").partition(" ")[2].strip()
    if not ids.credential_ok(node, given):
        return error(401, "unauthorized", f"send node {node}'s credential as the bearer token")
    if why := name_problem(name, "artifact name"):
        return error(422, "invalid artifact", why)
    files = _files(request)
    if why := _not_current(files.mesh, node, task_id, attempt):
        return error(409, "stale attempt", why)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and (len(declared) > 18 or int(declared) > MAX_ARTIFACT_BYTES):
        return error(413, "artifact too large", f"over {MAX_ARTIFACT_BYTES} bytes per artifact")
    claim = files.claim(task_id, attempt, name)
    if isinstance(claim, str):
        return error(413, "too many artifacts", claim)
    try:  # the declared size is held before a byte is read: concurrent uploads cannot overrun
        if refused := claim.grow(int(declared) if declared.isdigit() else 0):
            return refused
        got = await _receive(request, files, claim, files.attempt_dir(task_id, attempt) / name)
    except OSError as exc:  # not on disk: the node tries again, then reports it cut
        log.error("artifact %s of task %s.%d not stored: %s", name, task_id, attempt, exc,
                  extra={"task": task_id, "attempt": attempt, "node": node})
        return error(507, "not stored", f"artifact {name!r} could not be written: {exc}")
    finally:
        claim.release()  # a no-op once committed
    if isinstance(got, Response):
        return got
    size, digest = got
    if why := _not_current(files.mesh, node, task_id, attempt):  # fenced while it came in
        return error(409, "stale attempt", why)
    log.info("artifact %s of task %s.%d stored (%d bytes)", name, task_id, attempt, size,
             extra={"task": task_id, "attempt": attempt, "node": node})
    return JSON({"name": name, "size": size, "sha256": digest})


def _not_current(mesh: Mesh, node: str, task_id: str, attempt: int) -> str:
    t = mesh.tasks.get(task_id)
    if t is not None and t.state in ACTIVE and t.node == node and t.attempt == attempt:
        return ""
    current = f"attempt {t.attempt} on {t.node}" if t is not None else "not running"
    return f"task {task_id} attempt {attempt} is not current on {node} ({current})"


async def _receive(
    request: Request, files: ArtifactFiles, claim: _Claim, path: Path
) -> tuple[int, str] | Response:
    """Stream the body to a staging file, holding each chunk's bytes before it is written;
    fsync, rename into place, enter it in the ledger, fsync the directory: (size, sha256)."""
    tmp = files.staging / f"{secrets.token_hex(8)}"
    await asyncio.to_thread(path.parent.mkdir, mode=0o700, parents=True, exist_ok=True)
    out = await asyncio.to_thread(_create, tmp)
    sha, size, buf = hashlib.sha256(), 0, bytearray()
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if refused := claim.grow(size):
                return refused
            sha.update(chunk)
            buf += chunk
            if len(buf) >= FLUSH_BYTES:
                await asyncio.to_thread(out.write, bytes(buf))
                buf.clear()
        digest = sha.hexdigest()
        async with claim.at.finishing:  # the ledger names what the last rename put there
            await asyncio.to_thread(_place, out, bytes(buf), tmp, path)
            claim.commit(size, digest)
        await asyncio.to_thread(fsync_dir, path.parent)
    finally:
        if not out.closed:
            await asyncio.to_thread(out.close)
        await asyncio.to_thread(tmp.unlink, True)
    return size, digest


def _create(tmp: Path) -> IO[bytes]:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    return open(fd, "wb")


def _place(out: IO[bytes], tail: bytes, tmp: Path, path: Path) -> None:
    out.write(tail)
    out.flush()
    os.fsync(out.fileno())
    out.close()
    os.replace(tmp, path)


# --- GET: a user downloads -------------------------------------------------------------------


async def download(request: Request) -> Response:
    task_id, name = request.path_params["task_id"], request.path_params["name"]
    files = _files(request)
    t = await files.mesh.lookup(task_id)
    if t is None or not principal_of(request).sees(t.tenant):
        return error(404, "unknown task", f"no task {task_id}")
    listed = {a.get("name"): a for a in (t.result or {}).get("artifacts") or []}
    if name not in listed or name_problem(name, "artifact name"):
        have = ", ".join(sorted(str(n) for n in listed if not name_problem(str(n)))) or "none"
        return error(404, "unknown artifact", f"task {task_id} has no artifact {name!r} "
                     f"(its artifacts: {have})")
    if (t.finished_at or 0) + files.retention_s <= time.time():
        return error(410, "artifact expired", f"deleted {files.retention_s:g}s after the task "
                     "finished (MESH_ARTIFACT_RETENTION_S)")
    opened = await asyncio.to_thread(
        _open_inside, files.root, [t.id, str(t.attempt), *name.split("/")])
    if opened == "gone":
        return error(410, "artifact gone", f"{name!r} of task {task_id} is no longer stored "
                     "on this coordinator")
    if isinstance(opened, str):
        log.warning("artifact %s of task %s not served: %s", name, t.id, opened,
                    extra={"task": t.id, "attempt": t.attempt, "cause": "artifacts"})
        return error(404, "unknown artifact", f"task {task_id} has no artifact {name!r}")
    f, size = opened
    leaf = name.rpartition("/")[2]
    quoted = quote(leaf)
    disposition = (f'attachment; filename="{leaf}"' if quoted == leaf
                   else f"attachment; filename*=utf-8''{quoted}")
    return StreamingResponse(_chunks(f), media_type="application/octet-stream", headers={
        "content-length": str(size), "content-disposition": disposition,
        "x-sha256": str(listed[name].get("sha256", ""))})


def _open_inside(root: Path, parts: list[str]) -> tuple[IO[bytes], int] | str:
    """Blocking: open `root/<parts...>` one component at a time, each relative to the
    directory opened before it with O_NOFOLLOW, so no `..`, absolute name or symlink (however
    placed) leads outside; the leaf must be a regular file. (The open file, its size), or
    "gone" (not there) or why it is refused."""
    if any(p in ("", ".", "..") or "/" in p or "\x00" in p for p in parts):
        return "not a plain relative name"
    nofollow = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return "gone"
    try:
        for part in parts[:-1]:
            inner = os.open(part, nofollow | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        leaf = os.open(parts[-1], nofollow | os.O_NONBLOCK, dir_fd=fd)  # a FIFO cannot block
    except FileNotFoundError:
        return "gone"
    except OSError as exc:  # ELOOP: a symlink; ENOTDIR: a file where a directory should be
        return f"{os.strerror(exc.errno or 0)} on the way"
    finally:
        os.close(fd)
    st = os.fstat(leaf)
    if not stat.S_ISREG(st.st_mode):
        os.close(leaf)
        return "not a regular file"
    return open(leaf, "rb"), st.st_size


async def _chunks(f: IO[bytes]) -> AsyncIterator[bytes]:
    try:
        while chunk := await asyncio.to_thread(f.read, READ_BYTES):
            yield chunk
    finally:
        await asyncio.to_thread(f.close)


artifact_routes = [
    Route("/nodes/{node}/tasks/{task_id}/{attempt}/artifacts/{name:path}", upload,
          methods=["PUT"]),
    Route("/tasks/{task_id}/artifacts/{name:path}", download),
]
