"""The queue across tenants: one `TaskQueue` (coordinator/scheduling/queue.py) per tenant.

Within a tenant, order is the TaskQueue's (priority and aging, class by class). Across
tenants, `choose` (coordinator/scheduling/fairshare.py: usage per weight) picks among the tenants
that
have a ready class. A decision costs O(tenants with queued work x log classes), however
long the backlog; with one tenant it is the TaskQueue's own `next`, as before tenants.
With `by_head` (the fifo and backfill policies) the tenant whose head comes first goes,
so the order across tenants is the order of submission.

A class key here is `(tenant, class key)`: `block` and `pop` take what `next` returned.
A class of a tenant at one of its quotas is blocked under `quota_wake_key(tenant)`, woken
when that tenant lets go of something (`wake_tenant`) or its quotas change (`wake_all`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Iterable, Iterator

from coordinator.scheduling.queue import ClassKey, Entry, Reason, TaskQueue

TenantKey = tuple[str, ClassKey]


def quota_wake_key(tenant: str) -> tuple[str, str]:
    return ("tenant-quota", tenant)


class QuotaHold:
    """Why a class waits for its tenant: read as a queued task's `reason`."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class FairQueue:
    def __init__(
        self, live: Callable[[str], bool], choose: Callable[[Iterable[str]], str],
        by_head: bool = False,
    ) -> None:
        self._live = live
        self._choose = choose
        self._by_head = by_head  # the strict policies: the earliest head of all, not fair share
        self._queues: dict[str, TaskQueue] = {}

    def _queue(self, tenant: str) -> TaskQueue:
        q = self._queues.get(tenant)
        if q is None:
            q = self._queues[tenant] = TaskQueue(self._live)
        return q

    def push(self, key: ClassKey, rank: float, seq: int, task_id: str, tenant: str = "") -> None:
        self._queue(tenant).push(key, rank, seq, task_id)

    def next(self) -> tuple[TenantKey, Entry] | None:
        """The next class to try, with its head: the chosen tenant's first ready class."""
        queues = self._queues
        if len(queues) == 1:  # one tenant: exactly the TaskQueue's order and cost
            tenant, q = next(iter(queues.items()))
            found = q.next()
            return None if found is None else ((tenant, found[0]), found[1])
        heads: dict[str, tuple[ClassKey, Entry]] = {}
        for tenant, q in list(queues.items()):
            found = q.next()
            if found is not None:
                heads[tenant] = found
            elif not len(q):
                del queues[tenant]  # nothing queued for it any more
        if not heads:
            return None
        if len(heads) == 1:
            tenant = next(iter(heads))
        elif self._by_head:
            tenant = min(heads, key=lambda k: heads[k][1])
        else:
            tenant = self._choose(heads)
        key, entry = heads[tenant]
        return (tenant, key), entry

    def pop(self, key: TenantKey) -> Entry:
        return self._queues[key[0]].pop(key[1])

    def block(self, key: TenantKey, reason: Reason, wake_keys: Iterable[Hashable]) -> None:
        self._queues[key[0]].block(key[1], reason, wake_keys)

    def reason(self, tenant: str, key: ClassKey) -> Reason | None:
        q = self._queues.get(tenant)
        return None if q is None else q.reasons.get(key)

    def wake(self, keys: Collection[Hashable]) -> int:
        return sum(q.wake(keys) for q in self._queues.values())

    def wake_tenant(self, tenant: str) -> int:
        q = self._queues.get(tenant)
        return 0 if q is None or not q.blocked else q.wake((quota_wake_key(tenant),))

    def wake_all(self) -> int:
        return sum(q.wake_all() for q in self._queues.values())

    def first_parked(self, why: type) -> Entry | None:
        """The earliest head of any tenant among classes blocked with a `why` reason."""
        found = [e for q in self._queues.values() if (e := q.first_parked(why)) is not None]
        return min(found, default=None)

    @property
    def blocked(self) -> int:
        return sum(q.blocked for q in self._queues.values())

    @property
    def woken(self) -> int:
        return sum(q.woken for q in self._queues.values())

    def entries(self) -> Iterator[tuple[ClassKey, Entry]]:
        for q in self._queues.values():
            yield from q.entries()

    def tenant_entries(self) -> Iterator[tuple[str, ClassKey, Entry]]:
        for tenant, q in self._queues.items():
            for key, entry in q.entries():
                yield tenant, key, entry

    def check(self) -> None:
        for q in self._queues.values():
            q.check()

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())
