"""The queue of waiting tasks: one heap per requirement class.

Tasks with equal placement needs (executor + requirements) share a class. Dispatch looks
only at the head of each class, so a million queued tasks that cannot fit cost one
placement attempt per pass, not a million. Order is by rank (lower first; the Mesh
derives it from priority and submission time, see `Mesh._rank`), then by submission
sequence, so a requeued task keeps its place ahead of newer work.

Removal is lazy: a cancelled task's entry stays until it reaches the head, where
`live(task_id)` says it is no longer waiting and it is dropped.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from typing import Protocol

ClassKey = tuple[str, bytes]


class Reason(Protocol):
    @property
    def reason(self) -> str: ...


Entry = tuple[float, int, str]  # (rank, seq, task_id)


class TaskQueue:
    def __init__(self, live: Callable[[str], bool]) -> None:
        self._live = live
        self._classes: dict[ClassKey, list[Entry]] = {}
        self.reasons: dict[ClassKey, Reason] = {}  # why the head of a class did not place

    def push(self, key: ClassKey, rank: float, seq: int, task_id: str) -> None:
        heapq.heappush(self._classes.setdefault(key, []), (rank, seq, task_id))

    def head(self, key: ClassKey) -> Entry | None:
        heap = self._classes.get(key)
        while heap:
            if self._live(heap[0][2]):
                return heap[0]
            heapq.heappop(heap)
        if heap is not None:
            del self._classes[key]
            self.reasons.pop(key, None)
        return None

    def pop(self, key: ClassKey) -> Entry:
        return heapq.heappop(self._classes[key])

    def heads(self) -> Iterator[tuple[ClassKey, Entry]]:
        for key in list(self._classes):
            entry = self.head(key)
            if entry is not None:
                yield key, entry

    def __len__(self) -> int:
        return len(self._classes)
