"""Reading a task's output file as it grows: streamed in chunks, and its tail at the end.

Blocking helpers (`read_from`, `read_tail`, `file_size`) are called through asyncio.to_thread.
"""

from __future__ import annotations

import asyncio
import codecs
import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

from gpu_client.executors.base import OnOutput

TAIL_INTERVAL_S = 0.25  # how often output.log is read for streaming
TAIL_READ_MAX = 256 * 1024  # more than this per read is skipped, with a marker


class Tail:
    """Streams what is appended to a file, decoded as UTF-8 across read boundaries."""

    def __init__(self, path: Path, offset: int, on_output: OnOutput) -> None:
        self._path, self._offset, self._on_output = path, offset, on_output
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    async def loop(self) -> None:
        while True:
            await self.read_once()
            await asyncio.sleep(TAIL_INTERVAL_S)

    async def read_once(self) -> None:
        data, offset, skipped = await asyncio.to_thread(read_from, self._path, self._offset)
        self._offset = offset
        if skipped:
            self._on_output(f"[... {skipped} bytes skipped]\n")
        text = self._decoder.decode(data)
        if text:
            self._on_output(text)


def read_from(path: Path, offset: int) -> tuple[bytes, int, int]:
    """(new bytes, new offset, bytes skipped because more than TAIL_READ_MAX were new)."""
    try:
        with open_regular(path) as f:
            size = f.seek(0, os.SEEK_END)
            skipped = max(0, size - offset - TAIL_READ_MAX)
            f.seek(offset + skipped)
            data = f.read(TAIL_READ_MAX)
    except OSError:  # missing, or a symlink or FIFO planted by the task
        return b"", offset, 0
    return data, offset + skipped + len(data), skipped


def read_tail(path: Path, limit: int) -> str:
    try:
        with open_regular(path) as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - limit))
            data = f.read(limit)
    except OSError:  # missing, or a symlink or FIFO planted by the task
        return ""
    if len(data) == limit and size > limit:
        data = data.lstrip(bytes(range(0x80, 0xC0)))[:limit]  # no half character in front
    return data.decode("utf-8", errors="replace")


def open_regular(path: Path) -> BinaryIO:
    """Open `path` for reading as the client (maybe root) without following a symlink the
    task planted there, and only if it is a regular file (a FIFO would block the reader):
    FileNotFoundError otherwise, so the caller treats it as absent."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FileNotFoundError(errno.ENOENT, "not a regular file", str(path))
    return os.fdopen(fd, "rb")


def read_small(path: Path, limit: int = 256) -> str:
    """The first `limit` bytes of a small record file (`pid`, `exit_code`) the task's user
    could have replaced: never through a symlink, never a FIFO. OSError if unreadable."""
    with open_regular(path) as f:
        return f.read(limit).decode("ascii", errors="replace")


def file_size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except FileNotFoundError:
        return 0
