"""The HTTP edge's limits: bodies read under a cap while streaming, submissions checked
against what the store and a node's frame can hold, `/tasks/active` streamed in slices,
and `/tasks/completed` cursors. Pure helpers for coordinator/web/api.py; no Mesh state here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from starlette.requests import Request

from coordinator.model import Task
from coordinator.storage.store_core import GroupCommitStore
from shared.limits import MAX_NAME, labels_refusal, name_refusal, refusal
from shared.protocol import MAX_FRAME_BYTES, Assign, encode
from shared.tasks import TaskSubmit, executor_for, launch_problem

MAX_OFFSET = 10_000  # `/tasks/completed?offset=` beyond this: use the `cursor` from `next`
ACTIVE_SLICE_S = 0.005  # `/tasks/active` renders this long, then yields the loop
# An assign's fields the submission does not fix: a UUID task id, the attempt, the vendor.
_ASSIGN_SLACK = 256


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"body larger than {limit} bytes (MESH_MAX_BODY_BYTES)")
        self.limit = limit


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused as soon as it passes `limit` bytes: a declared
    Content-Length over it is refused before a byte is read, and a streamed body is
    never held beyond the limit."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def item_refusal(item: dict[str, Any], where: str) -> str | None:
    """Store limits on a submitted object, before it is validated as a task."""
    why = refusal(item, where, max_bytes=1 << 62)  # the body cap bounds the total
    if why:
        return why
    for field in ("name", "tenant"):
        value = item.get(field)
        if isinstance(value, str) and (why := name_refusal(value, f"{where}.{field}")):
            return why
    req = item.get("requirements")
    if isinstance(req, dict):
        for field in ("labels", "node_selector"):
            labels = req.get(field)
            if isinstance(labels, dict) and all(isinstance(v, str) for v in labels.values()):
                if why := labels_refusal(labels, f"{where}.requirements.{field}"):
                    return why
        for field in ("gpu_type", "vendor", "min_compute_capability"):
            value = req.get(field)
            at = f"{where}.requirements.{field}"
            if isinstance(value, str) and (why := name_refusal(value, at)):
                return why
    return None


def assign_size(spec: TaskSubmit, params: dict[str, Any]) -> int:
    """The encoded size of the `assign` frame this task would get, as Mesh._assign_msg
    builds it, with its run-time fields at their longest (an upper bound)."""
    msg = Assign(
        task_id="0" * 36, attempt=spec.max_attempts, task_type=spec.task_type,
        priority=spec.priority, executor=executor_for(spec),
        gpu_indices=list(range(spec.requirements.gpu_count)), gpu_vendor="nvidia",
        script=spec.script, command=spec.command, image=spec.image, env=spec.env,
        timeout_s=spec.timeout_s, volumes=spec.volumes, shm_size=spec.shm_size,
        cpus=spec.cpus, mem_limit=spec.mem_limit, params=params,
        files=spec.files, artifacts=spec.artifacts, tenant=spec.tenant or "default",
    )
    return len(encode(msg)) + _ASSIGN_SLACK


def frame_refusal(spec: TaskSubmit, params: dict[str, Any], where: str) -> str | None:
    size = assign_size(spec, params)
    if size > MAX_FRAME_BYTES:
        return (
            f"{where}: its assign frame would be about {size} bytes, over the "
            f"{MAX_FRAME_BYTES}-byte WebSocket frame limit (MAX_FRAME_BYTES)"
        )
    return None


def launch_refusal(spec: TaskSubmit, where: str) -> str | None:
    """What no node could start (shared/tasks.py `launch_problem`), checked on the filled-in
    spec after its template: a 422 naming the field, so it is never charged to a node."""
    return launch_problem(spec, where)


# --- /tasks/completed cursors ------------------------------------------------------------


def encode_cursor(t: Task) -> str:
    raw = orjson.dumps([t.finished_at, t.id])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str] | None:
    """(finished_at, id) from a cursor, or None when it is not one of ours."""
    if len(cursor) > 4 * MAX_NAME:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        at, task_id = orjson.loads(raw)
    except (binascii.Error, ValueError, TypeError):
        return None
    if not isinstance(at, int | float) or isinstance(at, bool) or not isinstance(task_id, str):
        return None
    return float(at), task_id


# --- /tasks/active, streamed --------------------------------------------------------------

ACTIVE_CHUNK = 20_000  # ids per store read while walking the backlog


async def open_id_chunks(
    store: GroupCommitStore, chunk: int = ACTIVE_CHUNK
) -> AsyncIterator[list[str]]:
    """The ids of unfinished tasks in seq order, read from the store's `tasks_open` index in
    chunks on its reader thread. Not a copy of `Mesh.tasks`: copying 1,000,000 keys on the
    loop alone takes 20-40 ms. A task the Mesh holds but has not yet committed is not
    acknowledged to anyone yet, so leaving it out shows nothing uncommitted."""
    after = -1
    while True:
        rows = await store.open_ids(after, chunk)
        if not rows:
            return
        after = rows[-1][0]
        yield [task_id for _, task_id in rows]


async def stream_tasks(
    id_chunks: AsyncIterator[list[str]],
    lookup: Callable[[str], Task | None],
    render: Callable[[Task], dict[str, Any]],
    slice_s: float = ACTIVE_SLICE_S,
) -> AsyncIterator[bytes]:
    """`{"tasks": {id: view, ...}, "count": n}` in pieces. A task that is no longer
    unfinished in memory (or is hidden: `lookup` gives None) when its slice is rendered is
    left out, and `count` is what was written. Each slice holds the event loop about
    `slice_s`, then yields it."""
    yield b'{"tasks":{'
    count = 0
    parts: list[bytes] = []
    deadline = time.perf_counter() + slice_s
    async for ids in id_chunks:
        for n, task_id in enumerate(ids):
            t = lookup(task_id)
            if t is not None:
                body = orjson.dumps(render(t))
                parts.append(b"%s%s:%s" % (b"," if count else b"", orjson.dumps(t.id), body))
                count += 1
            if n % 64 == 63 and time.perf_counter() > deadline:
                yield b"".join(parts)
                parts.clear()
                await asyncio.sleep(0)
                deadline = time.perf_counter() + slice_s
    parts.append(b'},"count":%d}' % count)
    yield b"".join(parts)
