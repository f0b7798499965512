"""Self-fencing: a node cut off from the coordinator stops its running work on its own.

The coordinator declares a silent node lost after its node timeout and requeues its running
attempts elsewhere; a node that goes on running them would run each task twice. So the agent
`touch()`es a `Fence` whenever it hears from the coordinator (any frame, any pong to its own
pings), and `Fence.watch()` calls `on_fence()` once contact has been lost for longer than
`after_s` (MESH_FENCE_AFTER_S, a little over the coordinator's node timeout). It fires once
per loss of contact: the next contact re-arms it. Like Nomad's `stop_on_client_after`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Fence:
    def __init__(self, after_s: float, on_fence: Callable[[float], None]) -> None:
        self.after_s = after_s
        self._on_fence = on_fence
        self._last = time.monotonic()
        self._fired = False
        self.fenced = 0  # times it fired (tests)

    def touch(self) -> None:
        self._last = time.monotonic()
        self._fired = False

    @property
    def silent_s(self) -> float:
        return time.monotonic() - self._last

    async def watch(self) -> None:
        """Run until cancelled; never blocks: it only reads the clock."""
        if self.after_s <= 0:
            return
        while True:
            left = self.after_s - self.silent_s
            if left > 0 or self._fired:
                await asyncio.sleep(max(0.05, min(left, 1.0)) if not self._fired else 0.5)
                continue
            self._fired = True
            self.fenced += 1
            self._on_fence(self.silent_s)
