"""Making a renamed file survive a power cut: the rename is durable once its directory is fsynced.

Blocking: call it off the event loop (asyncio.to_thread), as its callers do.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """fsync a directory, so the entries created or renamed in it are on disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
