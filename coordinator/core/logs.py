"""Bounded in-memory output of tasks, with followers woken as chunks arrive."""

from __future__ import annotations

import asyncio
import weakref
from collections import OrderedDict, deque
from collections.abc import AsyncIterator


class LogBuffer:
    """The last `max_bytes` of a task's output; `follow()` streams what comes after."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._chunks: deque[str] = deque()
        self._size = 0
        self.dropped = 0  # characters dropped from the front to stay bounded
        self.total = 0  # characters ever appended: the offset followers track
        self.closed = False
        self._changed = asyncio.Event()

    def append(self, data: str) -> None:
        self._chunks.append(data)
        self._size += len(data)
        self.total += len(data)
        while self._size > self.max_bytes and len(self._chunks) > 1:
            gone = self._chunks.popleft()
            self._size -= len(gone)
            self.dropped += len(gone)
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def text(self) -> str:
        return "".join(self._chunks)

    def since(self, offset: int) -> tuple[str, int]:
        """Text after `offset` (as far as it is still held) and the new offset."""
        text = self.text()
        start = max(0, offset - self.dropped)
        return text[start:], self.total

    async def follow(self, idle_s: float) -> AsyncIterator[str]:
        offset = 0
        while True:
            chunk, offset = self.since(offset)
            if chunk:
                yield chunk
            if self.closed:
                return
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), idle_s)
            except TimeoutError:
                return


class TaskLogs:
    """Log buffers of unfinished tasks, plus the most recent finished ones."""

    def __init__(self, max_bytes: int = 256 * 1024, keep_finished: int = 1000) -> None:
        self.max_bytes = max_bytes
        self.keep_finished = keep_finished
        self._buffers: OrderedDict[str, LogBuffer] = OrderedDict()
        self._finished = 0
        self._followers: weakref.WeakSet[AsyncIterator[str]] = weakref.WeakSet()

    @property
    def followers(self) -> int:
        """Live `follow` streams (one not yet started counts until it is dropped)."""
        return len(self._followers)

    def follow(self, buf: LogBuffer, idle_s: float) -> AsyncIterator[str]:
        stream = buf.follow(idle_s)
        self._followers.add(stream)  # weak: a finished or abandoned stream leaves by itself
        return stream

    def get(self, task_id: str) -> LogBuffer | None:
        return self._buffers.get(task_id)

    def open(self, task_id: str) -> LogBuffer:
        buf = self._buffers.get(task_id)
        if buf is None:
            buf = self._buffers[task_id] = LogBuffer(self.max_bytes)
        return buf

    def finish(self, task_id: str) -> None:
        buf = self._buffers.get(task_id)
        if buf is None:
            return
        buf.close()
        self._buffers.move_to_end(task_id)
        self._finished += 1
        while self._finished > self.keep_finished:
            oldest = next(iter(self._buffers))
            if not self._buffers[oldest].closed:
                self._buffers.move_to_end(oldest)
                continue
            del self._buffers[oldest]
            self._finished -= 1
