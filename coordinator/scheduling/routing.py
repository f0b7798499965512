"""Which ready replica answers a request: a small policy over a live view of replicas. Pure.

- `least_loaded`: fewest requests in flight, by the power of two choices (two replicas drawn
  at random, the less busy one wins), so a burst does not pile onto the one replica that
  looked idlest a moment ago.
- `PrefixRing.pick`: consistent hashing of the prompt's first characters with bounded load,
  as KubeAI's PrefixHash does: requests sharing a prefix go to the same replica (its engine
  has that prefix's KV cache), unless that replica already has more than `load_factor`
  times the mean load, then the next replica clockwise on the ring that has room. The ring
  is built once per set of ready replicas and kept by the router.

No I/O, no clock; the random source is passed in.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

PREFIX_CHARS = 256  # characters of the prompt that choose the replica under `prefix` routing
VNODES = 64  # points on the ring per replica
LOAD_FACTOR = 1.25  # a replica may take a request while it holds at most this x the mean


class Routable(Protocol):
    @property
    def task_id(self) -> str: ...
    @property
    def outstanding(self) -> int: ...


R = TypeVar("R", bound=Routable)


def least_loaded(replicas: Sequence[R], rng: random.Random) -> R:
    """The less busy of two drawn at random (of only one or two: those), a tie to either."""
    if len(replicas) == 1:
        return replicas[0]
    a, b = (0, 1) if len(replicas) == 2 else rng.sample(range(len(replicas)), 2)
    ra, rb = replicas[a], replicas[b]
    if ra.outstanding == rb.outstanding:
        return ra if rng.random() < 0.5 else rb
    return ra if ra.outstanding < rb.outstanding else rb


def _load(r: Routable) -> int:
    return r.outstanding


def _hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class PrefixRing:
    """The ring of one set of replicas (by task id)."""

    __slots__ = ("ids", "_points", "_owners")

    def __init__(self, ids: Sequence[str], vnodes: int = VNODES) -> None:
        self.ids = tuple(ids)
        points = sorted(
            (_hash(f"{task_id}#{i}".encode()), task_id) for task_id in self.ids
            for i in range(vnodes)
        )
        self._points = [p for p, _ in points]
        self._owners = [o for _, o in points]

    def pick(self, key: str, replicas: Sequence[R], load_factor: float = LOAD_FACTOR) -> R:
        """The replica owning `key`'s point, or the next one clockwise with room; `replicas`
        (those that may take it now) may be fewer than the ring's."""
        by_id = {r.task_id: r for r in replicas}
        total = sum(r.outstanding for r in replicas)
        # Room: at most load_factor x the mean load with this request counted (at least 1).
        cap = max(1, math.ceil(load_factor * (total + 1) / len(replicas)))
        start = bisect.bisect(self._points, _hash(key[:PREFIX_CHARS].encode()))
        seen: set[str] = set()
        n = len(self._owners)
        for i in range(n):
            owner = self._owners[(start + i) % n]
            r = by_id.get(owner)
            if r is None or owner in seen:
                continue
            if r.outstanding + 1 <= cap:
                return r
            seen.add(owner)
            if len(seen) == len(by_id):
                break
        return min(replicas, key=_load)


def prompt_key(body: dict[str, Any]) -> str:
    """The text whose first PREFIX_CHARS characters choose a replica under `prefix` routing:
    the chat messages in order (role and content), or the prompt, or the embedding input."""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        size = 0
        for m in messages:
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            text = content if isinstance(content, str) else _text_parts(content)
            parts.append(f"{m.get('role', '')}:{text}\n")
            size += len(parts[-1])
            if size >= PREFIX_CHARS:
                break
        return "".join(parts)[:PREFIX_CHARS]
    for field in ("prompt", "input"):
        value = body.get(field)
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, str):
            return value[:PREFIX_CHARS]
    return ""


def _text_parts(content: Any) -> str:
    """The text parts of a multi-part message content (images and the rest left out)."""
    if not isinstance(content, list):
        return ""
    return "".join(p.get("text", "") for p in content
                   if isinstance(p, dict) and isinstance(p.get("text"), str))
