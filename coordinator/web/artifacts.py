"""Task artifacts on the coordinator: uploaded by nodes, kept on disk, served to their tenant.

`PUT /nodes/{node}/tasks/{task}/{attempt}/artifacts/{name}` (the node's credential as bearer):
taken only while that attempt is the task's current one on that node (fenced like a result),
streamed to `<data-dir>/artifacts/<task>/<attempt>/<name>` under a temporary name, fsynced,
renamed, the directory fsynced; only then the answer (name, size, sha256). The node sends its
result after every upload answered, and the result it sends lists them: the task row (the
store) names an attempt's artifacts only once they are on disk. Per attempt at most
MAX_ARTIFACT_FILES files of MAX_ARTIFACT_BYTES each and MAX_ARTIFACTS_TOTAL in all.

`GET /tasks/{id}/artifacts/{name}` serves one to whoever may read the task (tenant scoping as
`GET /tasks/{id}`), from the attempt the result names. Files survive a restart (they are on
disk; the result row names them). The sweeper deletes a finished task's artifacts
`MESH_ARTIFACT_RETENTION_S` after it finished (then 410 Gone), and uploads of attempts the
result does not name (fenced ones) once the task finished. With PostgreSQL the files stay on
the disk of the coordinator that took them (README, Limits).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, Response
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
    name_problem,
)
from shared.protocol import valid_node_name

log = logging.getLogger(__name__)

FLUSH_BYTES = 1 << 20  # body bytes buffered before one write on a worker thread
PART = ".part-"  # temporary upload names: `<name>.part-<random>`, never served


class ArtifactFiles:
    """The artifacts directory and its sweeper. Blocking file work goes to threads."""

    def __init__(self, root: Path, mesh: Mesh, retention_s: float) -> None:
        self.root, self.mesh, self.retention_s = root, mesh, retention_s
        self._sweeper: asyncio.Task[None] | None = None
        self.swept = 0  # task directories deleted so far (tests wait on it)

    def attempt_dir(self, task_id: str, attempt: int) -> Path:
        return self.root / task_id / str(attempt)

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="artifact-sweeper")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)

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
            if task_id in self.mesh.tasks:
                continue  # unfinished: its uploads may be the result's soon
            t = await self.mesh.store.get(task_id)
            if t is not None and t.state not in FINISHED:
                continue
            if t is None or (t.finished_at or 0) + self.retention_s <= now:
                await asyncio.to_thread(shutil.rmtree, self.root / task_id, True)
                gone += 1
                continue
            keep = str(t.attempt) if (t.result or {}).get("artifacts") else None
            for attempt in await asyncio.to_thread(_listdir, self.root / task_id):
                if attempt != keep:  # a fenced attempt's uploads, or none were named
                    await asyncio.to_thread(shutil.rmtree, self.root / task_id / attempt, True)
        self.swept += gone
        return gone


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
    dest = files.attempt_dir(task_id, attempt)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_ARTIFACT_BYTES:
        return error(413, "artifact too large", f"over {MAX_ARTIFACT_BYTES} bytes per artifact")
    try:
        if why := await asyncio.to_thread(_room_for, dest, name):
            return error(413, "too many artifacts", why)
        got = await _receive(request, dest / name)
    except OSError as exc:  # not on disk: the node tries again, then reports it cut
        log.error("artifact %s of task %s.%d not stored: %s", name, task_id, attempt, exc,
                  extra={"task": task_id, "attempt": attempt, "node": node})
        return error(507, "not stored", f"artifact {name!r} could not be written: {exc}")
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


def _room_for(dest: Path, name: str) -> str:
    """Blocking: why one more artifact does not fit this attempt's limits, or ""."""
    have = {}
    if dest.is_dir():
        for dirpath, _, names in os.walk(dest):
            for n in names:
                if PART not in n:
                    full = Path(dirpath) / n
                    have[full.relative_to(dest).as_posix()] = full.stat().st_size
    have.pop(name, None)  # a retried upload replaces its earlier copy
    if len(have) >= MAX_ARTIFACT_FILES:
        return f"an attempt keeps at most {MAX_ARTIFACT_FILES} artifacts"
    if sum(have.values()) >= MAX_ARTIFACTS_TOTAL:
        return f"an attempt keeps at most {MAX_ARTIFACTS_TOTAL} bytes of artifacts"
    return ""


async def _receive(request: Request, path: Path) -> tuple[int, str] | Response:
    """Stream the body to a temporary file beside `path`, fsync, rename: (size, sha256)."""
    tmp = path.with_name(f"{path.name}{PART}{secrets.token_hex(4)}")
    await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
    out = await asyncio.to_thread(tmp.open, "wb")
    sha, size, buf = hashlib.sha256(), 0, bytearray()
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_ARTIFACT_BYTES:
                return error(413, "artifact too large",
                             f"over {MAX_ARTIFACT_BYTES} bytes per artifact")
            sha.update(chunk)
            buf += chunk
            if len(buf) >= FLUSH_BYTES:
                await asyncio.to_thread(out.write, bytes(buf))
                buf.clear()
        await asyncio.to_thread(_finish_file, out, bytes(buf), tmp, path)
    finally:
        if not out.closed:
            await asyncio.to_thread(out.close)
        await asyncio.to_thread(tmp.unlink, True)
    return size, sha.hexdigest()


def _finish_file(out: Any, tail: bytes, tmp: Path, path: Path) -> None:
    out.write(tail)
    out.flush()
    os.fsync(out.fileno())
    out.close()
    os.replace(tmp, path)
    fsync_dir(path.parent)


# --- GET: a user downloads -------------------------------------------------------------------


async def download(request: Request) -> Response:
    task_id, name = request.path_params["task_id"], request.path_params["name"]
    files = _files(request)
    t = await files.mesh.lookup(task_id)
    if t is None or not principal_of(request).sees(t.tenant):
        return error(404, "unknown task", f"no task {task_id}")
    listed = {a.get("name"): a for a in (t.result or {}).get("artifacts") or []}
    if name not in listed:
        have = ", ".join(sorted(str(n) for n in listed)) or "none"
        return error(404, "unknown artifact", f"task {task_id} has no artifact {name!r} "
                     f"(its artifacts: {have})")
    if (t.finished_at or 0) + files.retention_s <= time.time():
        return error(410, "artifact expired", f"deleted {files.retention_s:g}s after the task "
                     "finished (MESH_ARTIFACT_RETENTION_S)")
    path = files.attempt_dir(task_id, t.attempt) / name
    if not await asyncio.to_thread(path.is_file):
        return error(410, "artifact gone", f"{name!r} of task {task_id} is no longer stored "
                     "on this coordinator")
    return FileResponse(path, media_type="application/octet-stream",
                        filename=Path(name).name, headers={"X-Sha256": listed[name]["sha256"]})


artifact_routes = [
    Route("/nodes/{node}/tasks/{task_id}/{attempt}/artifacts/{name:path}", upload,
          methods=["PUT"]),
    Route("/tasks/{task_id}/artifacts/{name:path}", download),
]
