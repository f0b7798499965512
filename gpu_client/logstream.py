"""A running task's output, batched into `task_log` messages that cannot flood the socket."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from shared.protocol import TaskLog

FLUSH_INTERVAL_S = 0.25  # output is gathered at least this long before it is sent
RATE_BYTES_S = 64 * 1024  # per task; what is over is dropped with a marker


class LogStream:
    """Feed it text (`feed`, from the executor); it sends TaskLogs through `send`.

    At most `rate` bytes a second leave, in messages at least `interval` apart; output over
    that is dropped and a `[... N bytes dropped]` marker says so. Memory is bounded by `rate`.
    """

    def __init__(
        self,
        task_id: str,
        attempt: int,
        send: Callable[[TaskLog], None],
        *,
        interval: float = FLUSH_INTERVAL_S,
        rate: int = RATE_BYTES_S,
    ) -> None:
        self._task_id, self._attempt, self._send = task_id, attempt, send
        self._interval, self._rate = interval, rate
        self._buf: list[bytes] = []
        self._size = 0
        self._dropped = 0
        self._seq = 0
        self._allowance = float(rate)
        self._last = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    def feed(self, text: str) -> None:
        if self._closed or not text:
            return
        data = text.encode("utf-8", errors="replace")
        if self._size + len(data) > self._rate:
            self._dropped += len(data)
        else:
            self._buf.append(data)
            self._size += len(data)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._interval, self.flush)

    def flush(self) -> None:
        """Send what was gathered, within the rate; called by the timer and by `close`."""
        self._timer = None
        now = time.monotonic()
        self._allowance = min(self._rate, self._allowance + (now - self._last) * self._rate)
        self._last = now
        data = b"".join(self._buf)
        self._buf.clear()
        self._size = 0
        keep = int(self._allowance)
        if len(data) > keep:
            self._dropped += len(data) - keep
            data = data[:keep]
        self._allowance -= len(data)
        text = data.decode("utf-8", errors="ignore")
        if self._dropped:
            text += f"\n[... {self._dropped} bytes dropped]\n"
            self._dropped = 0
        if text:
            self._send(TaskLog(task_id=self._task_id, attempt=self._attempt, data=text,
                               seq=self._seq))
            self._seq += 1

    def close(self) -> None:
        """Send what is left; later output is ignored."""
        if self._closed:
            return
        if self._timer is not None:
            self._timer.cancel()
        self.flush()
        self._closed = True
