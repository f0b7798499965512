"""The queue of waiting tasks: one heap per requirement class, and a heap of classes.

Tasks with equal placement needs (executor + requirements, and whatever else the Mesh
folds into `Task.class_key`) share a class; the queue treats the key as opaque. Order
is by rank (lower first; the Mesh derives it from priority and submission time, see
`Mesh._rank`), then by submission sequence, so a requeued task keeps its place ahead of
newer work.

A class is either ready or blocked:

- Ready classes sit in one heap ordered by their head entry (rank, seq, task_id), so the
  next decision is O(log classes). After its head is taken, a class goes back into the
  heap under its new head.
- A class whose head did not fit is blocked with the `NoFit` that says why (`reasons`,
  read by a queued task's status). It leaves the ready heap and waits in `_waiting`
  under a few wake keys (see `coordinator/scheduling/wake.py`): an event that brings capacity
  which could fit it looks its keys up and makes it ready again, to be tried once more.
  Blocked classes cost nothing per decision, however many there are.

Removal is lazy: a cancelled task's entry stays until it reaches the head of its class,
where `live(task_id)` says it is no longer waiting and it is dropped. The ready heap is
lazy the same way: a class is listed under one entry at a time (`_listed`); any other entry
of it (the head was taken, cancelled, or a better task arrived) is stale and dropped when it
surfaces, never pushed again, so the heap holds O(pushes) entries and a decision costs
O(log) however long the backlog (re-pushing stale entries once made it O(queued)).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator
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
        self._ready: list[tuple[float, int, str, ClassKey]] = []  # (head entry..., class)
        self._listed: dict[ClassKey, Entry] = {}  # the one live ready entry of a ready class
        self._blocked: dict[ClassKey, tuple[Hashable, ...]] = {}  # class -> its wake keys
        self._waiting: dict[Hashable, set[ClassKey]] = {}  # wake key -> blocked classes
        self.reasons: dict[ClassKey, Reason] = {}  # why the head of a class did not place
        self.woken = 0  # classes made ready by a wake, all-time (tests and metrics read it)

    # --- tasks -------------------------------------------------------------------------

    def push(self, key: ClassKey, rank: float, seq: int, task_id: str) -> None:
        entry = (rank, seq, task_id)
        heap = self._classes.get(key)
        if heap is None:
            self._classes[key] = [entry]
            self._list(key, entry)
            return
        better = not heap or entry < heap[0]
        heapq.heappush(heap, entry)
        if better and key not in self._blocked:
            self._list(key, entry)  # the old head's entry goes stale
        # a blocked class stays blocked: the same needs, so the same NoFit

    def head(self, key: ClassKey) -> Entry | None:
        """The first live entry of a class; an emptied class is forgotten."""
        heap = self._classes.get(key)
        while heap:
            if self._live(heap[0][2]):
                return heap[0]
            heapq.heappop(heap)
        if heap is not None:
            self._forget(key)
        return None

    def next(self) -> tuple[ClassKey, Entry] | None:
        """The ready class whose head comes first, with that head; None when no class is
        ready. The head stays queued until `pop`; `block` parks the class instead."""
        ready = self._ready
        while ready:
            rank, seq, task_id, key = ready[0]
            if self._listed.get(key) != (rank, seq, task_id):
                heapq.heappop(ready)  # stale: taken, parked, gone, or listed under another
                continue
            entry = self.head(key)
            if entry == (rank, seq, task_id):
                return key, entry
            heapq.heappop(ready)  # its head was cancelled: the class under its real head
            if entry is not None:
                self._list(key, entry)
        return None

    def _list(self, key: ClassKey, entry: Entry) -> None:
        self._listed[key] = entry
        heapq.heappush(self._ready, (*entry, key))

    def pop(self, key: ClassKey) -> Entry:
        """Take the head of a ready class (the one `next` returned)."""
        entry = heapq.heappop(self._classes[key])
        self.reasons.pop(key, None)
        following = self.head(key)
        if following is not None:
            self._list(key, following)
        else:
            self._listed.pop(key, None)
        return entry

    # --- blocking and waking -----------------------------------------------------------

    def block(self, key: ClassKey, reason: Reason, wake_keys: Iterable[Hashable]) -> None:
        """Park a class whose head did not fit until one of `wake_keys` is woken."""
        keys = tuple(dict.fromkeys(wake_keys))
        while self._ready and self._ready[0][3] == key:
            heapq.heappop(self._ready)  # its entry from `next`: drop it now, not later
        self._listed.pop(key, None)
        self.reasons[key] = reason
        self._unlink(key)
        self._blocked[key] = keys
        for wk in keys:
            self._waiting.setdefault(wk, set()).add(key)

    def wake(self, keys: Collection[Hashable]) -> int:
        """Make ready every blocked class waiting under any of `keys`; returns how many.
        Costs min(len(keys), wake keys in use) lookups plus the classes woken."""
        waiting = self._waiting
        if not waiting:
            return 0
        if len(waiting) < len(keys):
            hits = [wk for wk in waiting if wk in keys]
        else:
            hits = [wk for wk in keys if wk in waiting]
        woken = 0
        for wk in hits:
            for key in list(waiting.get(wk, ())):
                woken += self._unblock(key)
        return woken

    def wake_all(self) -> int:
        return sum(self._unblock(key) for key in list(self._blocked))

    def _unblock(self, key: ClassKey) -> int:
        if key not in self._blocked:
            return 0
        self._unlink(key)  # its reason stays readable until it is tried again
        entry = self.head(key)
        if entry is None:
            return 0
        self._list(key, entry)
        self.woken += 1
        return 1

    def _unlink(self, key: ClassKey) -> None:
        for wk in self._blocked.pop(key, ()):
            classes = self._waiting.get(wk)
            if classes is not None:
                classes.discard(key)
                if not classes:
                    del self._waiting[wk]

    def _forget(self, key: ClassKey) -> None:
        del self._classes[key]
        self._listed.pop(key, None)
        self._unlink(key)
        self.reasons.pop(key, None)

    # --- views -------------------------------------------------------------------------

    def is_blocked(self, key: ClassKey) -> bool:
        return key in self._blocked

    def first_parked(self, why: type) -> Entry | None:
        """The earliest head among the classes blocked with a reason of type `why` (the
        strict policies' barrier, coordinator/scheduling/policy.py); O(blocked classes)."""
        first: Entry | None = None
        for key in list(self._blocked):
            if isinstance(self.reasons.get(key), why):
                entry = self.head(key)
                if entry is not None and (first is None or entry < first):
                    first = entry
        return first

    @property
    def blocked(self) -> int:
        return len(self._blocked)

    def entries(self) -> Iterator[tuple[ClassKey, Entry]]:
        """Every entry, live or not, with its class: for invariant checks, O(entries)."""
        for key, heap in self._classes.items():
            for entry in heap:
                yield key, entry

    def check(self) -> None:
        """The queue's own invariants; raises AssertionError naming the broken one."""
        for key in self._blocked:
            assert key in self._classes, ("blocked class without tasks", key)
            for wk in self._blocked[key]:
                assert key in self._waiting.get(wk, ()), ("blocked class not indexed", key, wk)
        for wk, classes in self._waiting.items():
            assert classes, ("empty wake bucket", wk)
            for key in classes:
                assert wk in self._blocked.get(key, ()), ("indexed class not blocked", key, wk)
        in_heap = {(r, s, t, k) for r, s, t, k in self._ready}
        for key, listed in self._listed.items():
            assert key not in self._blocked, ("blocked class listed as ready", key)
            assert (*listed, key) in in_heap, ("listed entry not in the ready heap", key)
        for key, heap in self._classes.items():
            live = [e for e in heap if self._live(e[2])]
            if key in self._blocked or not live:
                continue
            assert key in self._listed and self._listed[key] <= min(live), (
                "ready class without an entry at or before its head in the ready heap", key,
            )

    def __len__(self) -> int:
        return len(self._classes)
