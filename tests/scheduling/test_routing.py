"""Routing policies (coordinator/scheduling/routing.py): pure, so tested by the hundred."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from coordinator.scheduling.routing import PREFIX_CHARS, PrefixRing, least_loaded, prompt_key


@dataclass
class R:
    task_id: str
    outstanding: int = 0


def test_least_loaded_spreads_a_burst_evenly() -> None:
    rng = random.Random(1)
    replicas = [R(f"r{i}") for i in range(4)]
    for _ in range(400):  # requests that stay in flight: each pick adds load
        least_loaded(replicas, rng).outstanding += 1
    loads = [r.outstanding for r in replicas]
    assert max(loads) - min(loads) <= 10, loads  # two choices keep them close


def test_least_loaded_takes_the_idle_one_of_two() -> None:
    a, b = R("a", 5), R("b", 0)
    assert all(least_loaded([a, b], random.Random(i)) is b for i in range(20))
    assert least_loaded([a], random.Random(0)) is a


def test_prefix_sticks_to_one_replica_while_it_has_room() -> None:
    replicas = [R(f"r{i}") for i in range(4)]
    ring = PrefixRing([r.task_id for r in replicas])
    system = "You are a helpful assistant. " * 20
    first = ring.pick(system + "question 1", replicas)
    assert all(ring.pick(system + f"question {i}", replicas) is first for i in range(50))
    # different prefixes spread over the replicas
    owners = Counter(ring.pick(f"user {i} asks", replicas).task_id for i in range(400))
    assert len(owners) == 4 and min(owners.values()) > 40, owners


def test_prefix_overflows_to_the_next_replica_past_the_load_bound() -> None:
    replicas = [R(f"r{i}") for i in range(4)]
    ring = PrefixRing([r.task_id for r in replicas])
    key = "a shared prefix"
    picked: Counter[str] = Counter()
    for _ in range(40):  # all in flight at once
        r = ring.pick(key, replicas)
        r.outstanding += 1
        picked[r.task_id] += 1
    total = sum(picked.values())
    # no replica above 1.25 x the mean (rounded up), as KubeAI's bounded load
    assert max(picked.values()) <= -(-1.25 * total // 4) + 1, picked
    assert len(picked) == 4


def test_ring_is_stable_when_a_replica_leaves() -> None:
    ids = [f"r{i}" for i in range(5)]
    full = PrefixRing(ids)
    less = PrefixRing(ids[:-1])
    everyone = [R(i) for i in ids]
    moved = sum(full.pick(f"k{i}", everyone).task_id != less.pick(f"k{i}", everyone[:-1]).task_id
                for i in range(500))
    owned_by_gone = sum(full.pick(f"k{i}", everyone).task_id == "r4" for i in range(500))
    assert moved == owned_by_gone  # only the keys of the replica that left move


def test_prompt_key() -> None:
    chat = {"messages": [{"role": "system", "content": "S" * 10},
                         {"role": "user", "content": [{"type": "text", "text": "hi"},
                                                      {"type": "image_url"}]}]}
    assert prompt_key(chat) == "system:" + "S" * 10 + "\nuser:hi\n"
    assert prompt_key({"prompt": "p" * 1000}) == "p" * PREFIX_CHARS
    assert prompt_key({"prompt": ["first", "second"]}) == "first"
    assert prompt_key({"input": "embed me"}) == "embed me"
    assert prompt_key({"messages": "not a list"}) == ""
    assert prompt_key({"messages": [1, None, {"content": 5}]}) == ":\n"


def test_prefix_ring_skips_replicas_that_cannot_take_a_request_now() -> None:
    everyone = [R(f"r{i}") for i in range(3)]
    ring = PrefixRing([r.task_id for r in everyone])
    owned = [f"k{i}" for i in range(300) if ring.pick(f"k{i}", everyone).task_id == "r0"]
    assert owned
    for key in owned:  # r0 is full (not offered): its keys go to the others
        assert ring.pick(key, everyone[1:]).task_id in ("r1", "r2")
    others = [f"k{i}" for i in range(300) if f"k{i}" not in owned]
    assert all(ring.pick(k, everyone[1:]).task_id == ring.pick(k, everyone).task_id
               for k in others)  # nobody else's keys move
