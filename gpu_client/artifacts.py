"""Upload an attempt's artifacts to the coordinator before its result is sent.

Why HTTP and not the WebSocket: an artifact may be 8 MiB and a frame is at most 1 MiB; chunks
over the socket would queue behind (and hold up) heartbeats and results on the one connection
and need reassembly state on the coordinator. A `PUT` per file streams from disk, is fenced
like a result (the coordinator takes it only for the task's current attempt on this node) and
is authenticated with this node's credential. Each `PUT` answers only once the file is fsynced
and renamed into place, and the result (listing name, size, sha256 as the coordinator computed
them) is sent only after every upload has answered: a committed result never names a file
that is not on the coordinator's disk.

An upload that fails (the coordinator away, refused) is tried a few times; then the result
goes without it, saying so in `artifacts_cut`. Blocking HTTP runs through asyncio.to_thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import logging
import ssl
import urllib.parse
from pathlib import Path
from typing import Any

from gpu_client.credential import load_any
from gpu_client.executors.base import RunOutcome
from gpu_client.settings import ClientSettings
from shared.files import ArtifactRef

log = logging.getLogger(__name__)

TRIES = 4
RETRY_S = 0.5  # doubled after each failed try
TIMEOUT_S = 60.0


class UploadRefused(Exception):
    """The coordinator answered with a 4xx: trying again will not help."""


async def ship(
    settings: ClientSettings, base_url: str, credentials: list[Path], task_id: str,
    attempt: int, outcome: RunOutcome,
) -> RunOutcome:
    """`outcome` with `uploaded` set to what the coordinator at `base_url` (the one this node
    talks to) stored; failures become notes."""
    found = outcome.artifacts
    if found is None or not found.files:
        return outcome
    secret = await asyncio.to_thread(load_any, credentials)
    uploaded: list[ArtifactRef] = []
    notes = list(found.notes)
    for name, path, _ in found.files:
        try:
            uploaded.append(await _upload_with_retries(
                settings, base_url, secret, task_id, attempt, name, path))
        except (OSError, UploadRefused, ValueError) as exc:
            log.warning("task %s.%d: artifact %s not uploaded: %s", task_id, attempt, name, exc,
                        extra={"task": task_id, "attempt": attempt})
            notes.append(f"{name}: upload failed: {exc}")
    found = dataclasses.replace(found, notes=notes)
    return dataclasses.replace(outcome, artifacts=found, uploaded=tuple(uploaded))


def result_fields(outcome: RunOutcome) -> dict[str, Any]:
    """The TaskOutcome fields about artifacts, for the agent's result."""
    notes = outcome.artifacts.notes if outcome.artifacts is not None else []
    return {"artifacts": list(outcome.uploaded), "artifacts_cut": list(notes)}


async def _upload_with_retries(
    settings: ClientSettings, base: str, secret: str, task_id: str, attempt: int, name: str,
    path: Path,
) -> ArtifactRef:
    delay = RETRY_S
    for n in range(TRIES):
        try:
            return await asyncio.to_thread(
                _put, settings, base, secret, task_id, attempt, name, path)
        except (OSError, http.client.HTTPException) as exc:
            if n == TRIES - 1:
                raise OSError(f"{type(exc).__name__}: {exc}") from exc
            await asyncio.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def upload_url(settings: ClientSettings, base: str, task_id: str, attempt: int,
               name: str) -> str:
    """`http(s)://host:port/nodes/{node}/tasks/{task}/{attempt}/artifacts/{name}`."""
    for ws, http_ in (("wss://", "https://"), ("ws://", "http://")):
        if base.startswith(ws):
            base = http_ + base[len(ws):]
    quoted = urllib.parse.quote(name, safe="/")
    return f"{base}/nodes/{settings.node_name}/tasks/{task_id}/{attempt}/artifacts/{quoted}"


def _put(
    settings: ClientSettings, base: str, secret: str, task_id: str, attempt: int, name: str,
    path: Path,
) -> ArtifactRef:
    """Blocking: stream one file; the coordinator's (size, sha256) come back."""
    url = urllib.parse.urlsplit(upload_url(settings, base, task_id, attempt, name))
    conn: http.client.HTTPConnection
    if url.scheme == "https":
        ctx = ssl.create_default_context(
            cafile=str(settings.ca_file) if settings.ca_file else None
        )
        conn = http.client.HTTPSConnection(url.netloc, timeout=TIMEOUT_S, context=ctx)
    else:
        conn = http.client.HTTPConnection(url.netloc, timeout=TIMEOUT_S)
    try:
        with path.open("rb") as body:
            size = path.stat().st_size
            conn.request("PUT", url.path, body=body, headers={
                "Authorization": f"Bearer {secret}", "Content-Length": str(size),
                "Content-Type": "application/octet-stream",
            })
            resp = conn.getresponse()
            raw = resp.read()
    finally:
        conn.close()
    if 400 <= resp.status < 500:
        raise UploadRefused(f"{resp.status}: {raw[:300].decode(errors='replace')}")
    if resp.status != 200:
        raise OSError(f"HTTP {resp.status}: {raw[:300].decode(errors='replace')}")
    doc = json.loads(raw)
    return ArtifactRef(name=str(doc["name"]), size=int(doc["size"]), sha256=str(doc["sha256"]))
