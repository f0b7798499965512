"""Threads for the docker executor's long blocking calls: waiting, following logs, pulling.

Each gets a daemon thread of its own rather than a worker of asyncio's default pool: a
container's `wait` and log stream last as long as the task, and asyncio.run's shutdown
waits for the default pool, so it would wait for running containers to end.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import docker
from docker.errors import DockerException
from requests.exceptions import RequestException

from gpu_client.executors.base import OnOutput

log = logging.getLogger(__name__)

PUMP_BUFFER_MAX = 1 << 20  # output not yet handed to the loop; more is dropped, with a marker
DOCKER_ERRORS = (DockerException, RequestException)

T = TypeVar("T")


class LogPump:
    """Follows a container's log stream on a thread; hands text to the loop in batches."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_output: OnOutput) -> None:
        self._loop, self._on_output = loop, on_output
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._pending_size = 0
        self._dropped = 0
        self._scheduled = False
        self._detached = False
        self._tail = ""
        self._thread: threading.Thread | None = None

    def start(self, client: docker.DockerClient, cid: str, tail: str | int) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(client, cid, tail), name=f"logs-{cid[:12]}", daemon=True
        )
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def detach(self) -> None:
        self._detached = True

    def text_tail(self, limit: int) -> str:
        with self._lock:
            return self._tail[-limit:] if limit else ""

    def _run(self, client: docker.DockerClient, cid: str, tail: str | int) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            stream = client.api.logs(cid, stream=True, follow=True, stdout=True, stderr=True,
                                     tail=tail)
        except DOCKER_ERRORS as exc:
            log.debug("no log stream for %s: %s", cid[:12], exc)
            return
        try:
            for chunk in stream:
                if self._detached:
                    return
                self._push(decoder.decode(chunk))
            self._push(decoder.decode(b"", final=True))
        except DOCKER_ERRORS as exc:
            log.debug("log stream of %s ended: %s", cid[:12], exc)
        finally:
            try:
                stream.close()
            except (OSError, DockerException) as exc:
                log.debug("closing the log stream of %s: %s", cid[:12], exc)

    def _push(self, text: str) -> None:
        if not text:
            return
        with self._lock:
            self._tail = (self._tail + text)[-(64 * 1024):]
            if self._pending_size + len(text) > PUMP_BUFFER_MAX:
                self._dropped += len(text)
            else:
                self._pending.append(text)
                self._pending_size += len(text)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: the client is exiting
            self._detached = True

    def _deliver(self) -> None:
        with self._lock:
            text = "".join(self._pending)
            if self._dropped:
                text += f"\n[... {self._dropped} characters dropped]\n"
            self._pending.clear()
            self._pending_size = self._dropped = 0
            self._scheduled = False
        if not self._detached:
            self._on_output(text)


def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> asyncio.Future[T]:
    """Run a long blocking call on a daemon thread of its own; await the returned future.

    Cancelling the future does not stop the call; its result is then dropped.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    def target() -> None:
        try:
            result, exc = fn(*args, **kwargs), None
        except BaseException as caught:  # noqa: BLE001 - handed to the awaiting coroutine
            result, exc = None, caught
        try:
            loop.call_soon_threadsafe(settle, result, exc)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    threading.Thread(target=target, name=f"docker-{fn.__name__}", daemon=True).start()
    return future
