"""The pure part of fair share (coordinator/scheduling/fairshare.py) and the queue across tenants
(coordinator/scheduling/fairqueue.py), with hypothesis: no server, no clock but the simulated
one."""

from __future__ import annotations

import heapq

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.scheduling.fairqueue import FairQueue, QuotaHold, quota_wake_key
from coordinator.scheduling.fairshare import (
    Ledger,
    TenantConfig,
    choose,
    decayed,
    quota_hold,
    weighted_jain,
)
from coordinator.scheduling.queue import ClassKey, TaskQueue
from coordinator.scheduling.tenants import TokenBucket


def simulate(
    weights: dict[str, float], gpus: int, durations: dict[str, float], horizon: float,
    half_life_s: float = 0.0,
) -> dict[str, float]:
    """Every tenant keeps work queued; each freed GPU goes to `choose`'s tenant. Returns
    the GPU-seconds each tenant got over the horizon (cut at the horizon)."""
    ledger = Ledger(half_life_s)
    running: list[tuple[float, int, str]] = []  # (end, id, tenant)
    got = dict.fromkeys(weights, 0.0)
    now, ids = 0.0, 0
    while now < horizon:
        while len(running) < gpus:
            tenant = choose(weights, ledger, weights, now)
            ids += 1
            ledger.start(str(ids), tenant, 1, now, True)
            heapq.heappush(running, (now + durations[tenant], ids, tenant))
        end, task_id, tenant = heapq.heappop(running)
        got[tenant] += min(end, horizon) - (end - durations[tenant])
        now = end
        ledger.stop(str(task_id), now)
    return got


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    gpus=st.integers(1, 8),
    lengths=st.lists(st.sampled_from([0.05, 0.1, 0.2, 0.5]), min_size=4, max_size=4),
)
def test_shares_converge_to_weights(weights: list[int], gpus: int, lengths: list[float]) -> None:
    names = [f"t{i}" for i in range(len(weights))]
    w = {n: float(x) for n, x in zip(names, weights, strict=True)}
    durations = {n: lengths[i] for i, n in enumerate(names)}
    horizon = 400 * max(lengths) * len(names) / gpus + 50
    got = simulate(w, gpus, durations, horizon)
    total, wsum = sum(got.values()), sum(w.values())
    for n in names:
        target = w[n] / wsum
        assert abs(got[n] / total - target) <= 0.1 * target + 0.01, (n, got, w)
    jain = weighted_jain(got, w)
    assert jain is not None and jain >= 0.95


def test_one_to_three_splits_25_75() -> None:
    got = simulate({"a": 1.0, "b": 3.0}, 4, {"a": 0.1, "b": 0.1}, 100.0, half_life_s=60.0)
    share = got["a"] / (got["a"] + got["b"])
    assert 0.225 <= share <= 0.275, got


def test_decay_halves_every_half_life() -> None:
    assert decayed(8.0, 10.0, 20.0, 10.0) == pytest.approx(4.0)
    assert decayed(8.0, 10.0, 40.0, 10.0) == pytest.approx(1.0)
    assert decayed(8.0, 10.0, 40.0, 0.0) == 8.0  # no half-life: never forgotten
    ledger = Ledger(10.0)
    ledger.start("x", "a", 2, 0.0, True)
    assert ledger.usage("a", 5.0) == pytest.approx(10.0)  # running work counts so far
    ledger.stop("x", 5.0)
    assert ledger.usage("a", 15.0) == pytest.approx(5.0)
    assert ledger.use["a"].gpus == 0 and ledger.use["a"].running == 0


def test_choose_prefers_less_usage_per_weight() -> None:
    ledger = Ledger()
    ledger.start("1", "a", 1, 0.0, True)
    ledger.start("2", "b", 2, 0.0, True)
    # at t=10: a used 10 (weight 1 -> 10), b used 20 (weight 4 -> 5): b is further behind
    assert choose(["a", "b"], ledger, {"a": 1.0, "b": 4.0}, 10.0) == "b"
    assert choose(["a", "b"], ledger, {}, 10.0) == "a"


ops = st.lists(
    st.tuples(st.booleans(), st.integers(0, 4), st.booleans(), st.integers(0, 30)),
    max_size=200,
)


@settings(max_examples=150, deadline=None)
@given(
    ops=ops,
    max_gpus=st.none() | st.integers(0, 8),
    max_running=st.none() | st.integers(0, 6),
    max_np=st.none() | st.integers(0, 4),
)
def test_quotas_are_never_exceeded(
    ops: list[tuple[bool, int, bool, int]], max_gpus: int | None, max_running: int | None,
    max_np: int | None,
) -> None:
    config = TenantConfig(max_gpus=max_gpus, max_running=max_running, max_nonpreemptible=max_np)
    ledger = Ledger(30.0)
    live: list[str] = []
    for step, (start, gpus, preemptible, pick) in enumerate(ops):
        now = float(step)
        if start or not live:
            if not quota_hold(config, ledger.use.get("t"), gpus, preemptible, "t"):
                live.append(str(step))
                ledger.start(str(step), "t", gpus, now, preemptible)
        else:
            ledger.stop(live.pop(pick % len(live)), now)
        use = ledger.of("t")
        assert max_gpus is None or use.gpus <= max_gpus
        assert max_running is None or use.running <= max_running
        assert max_np is None or use.nonpreemptible_gpus <= max_np
        assert use.running == len(live)


def test_quota_reasons_name_the_quota() -> None:
    ledger = Ledger()
    ledger.start("1", "lab", 3, 0.0, True)
    why = quota_hold(TenantConfig(max_gpus=4), ledger.use["lab"], 2, True, "lab")
    assert "GPU quota" in why and "3 of 4" in why
    assert quota_hold(TenantConfig(max_gpus=4), ledger.use["lab"], 1, True, "lab") == ""
    why = quota_hold(TenantConfig(max_running=1), ledger.use["lab"], 0, True, "lab")
    assert "1 running tasks" in why
    why = quota_hold(TenantConfig(max_nonpreemptible=1), ledger.use["lab"], 2, False, "lab")
    assert "non-preemptible" in why


def test_weighted_jain() -> None:
    assert weighted_jain({"a": 25.0, "b": 75.0}, {"a": 1.0, "b": 3.0}) == pytest.approx(1.0)
    assert weighted_jain({"a": 50.0, "b": 50.0}, {"a": 1.0, "b": 3.0}) < 0.85
    assert weighted_jain({}, {}) is None


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=2.0, burst=4.0, tokens=4.0, at=0.0)
    assert [bucket.take(1, 0.0) for _ in range(4)] == [0.0] * 4
    assert bucket.take(1, 0.0) == pytest.approx(0.5)
    assert bucket.take(1, 0.5) == 0.0
    assert bucket.take(2, 0.5) == pytest.approx(1.0)


entries = st.lists(
    st.tuples(st.sampled_from(["x", "y", "z"]), st.integers(0, 10)), min_size=1, max_size=60
)


@settings(max_examples=100, deadline=None)
@given(entries=entries)
def test_one_tenant_orders_as_the_task_queue(entries: list[tuple[str, int]]) -> None:
    def live(task_id: str) -> bool:
        return True

    plain, fair = TaskQueue(live), FairQueue(live, lambda c: min(c))
    for seq, (cls, rank) in enumerate(entries):
        key = ("process", cls.encode())
        plain.push(key, float(rank), seq, f"t{seq}")
        fair.push(key, float(rank), seq, f"t{seq}", "only")
    order_plain, order_fair = [], []
    while (found := plain.next()) is not None:
        order_plain.append(plain.pop(found[0]))
    while (got := fair.next()) is not None:
        order_fair.append(fair.pop(got[0]))
    assert order_fair == order_plain


def test_fair_queue_picks_by_chooser_and_parks_a_tenant_at_quota() -> None:
    fair = FairQueue(lambda _: True, lambda c: sorted(c)[-1])  # picks the last name
    key = ("process", b"")
    for i, tenant in enumerate(["a", "b", "a", "b"]):
        fair.push(key, 0.0, i, f"t{i}", tenant)
    (tenant, cls), (_, _, task_id) = fair.next()  # type: ignore[misc]
    assert tenant == "b" and task_id == "t1"
    fair.block((tenant, cls), QuotaHold("tenant b is at its GPU quota"), [quota_wake_key("b")])
    (tenant, _), (_, _, task_id) = fair.next()  # type: ignore[misc]
    assert tenant == "a" and task_id == "t0"
    assert fair.reason("b", cls).reason == "tenant b is at its GPU quota"  # type: ignore[union-attr]
    assert fair.wake_tenant("a") == 0 and fair.wake_tenant("b") == 1
    assert fair.next()[0][0] == "b"  # type: ignore[index]
    fair.check()


def test_a_decision_costs_the_same_however_long_the_backlog() -> None:
    """A stale ready entry is dropped, never pushed again (coordinator/scheduling/queue.py): the
    ready heap stays as small as the classes, so next+pop is O(log), not O(queued)."""
    q = TaskQueue(lambda _: True)
    for i in range(5000):
        q.push(("process", b"%d" % (i % 3)), float(i % 7), i, f"t{i}")
    filled = peak = len(q._ready)  # the fill's stale entries are dropped as they surface
    while (found := q.next()) is not None:
        q.pop(found[0])
        peak = max(peak, len(q._ready))
    assert peak <= filled + 3, (filled, peak)  # re-pushing stale entries grew it to 5000


queue_ops = st.lists(
    st.tuples(st.sampled_from(["push", "push", "take", "block", "wake", "cancel"]),
              st.integers(0, 3), st.integers(0, 5)),
    max_size=120,
)


@settings(max_examples=200, deadline=None)
@given(ops=queue_ops)
def test_task_queue_matches_a_sorted_model(ops: list[tuple[str, int, int]]) -> None:
    """Whatever the interleaving of pushes, takes, blocks, wakes and cancels, `next` is the
    best live entry of the classes not blocked, and the queue's invariants hold."""
    live: dict[str, tuple[float, int, str, ClassKey]] = {}
    q = TaskQueue(lambda task_id: task_id in live)
    blocked: set[ClassKey] = set()
    for seq, (op, cls, rank) in enumerate(ops):
        key = ("process", b"%d" % cls)
        if op == "push":
            live[f"t{seq}"] = (float(rank), seq, f"t{seq}", key)
            q.push(key, float(rank), seq, f"t{seq}")
        elif op == "cancel" and live:
            del live[sorted(live)[rank % len(live)]]
        elif op == "wake":
            q.wake({("wk", cls)})
            blocked.discard(key)
        elif op in ("take", "block"):
            found = q.next()
            ready = [e for e in live.values() if e[3] not in blocked]
            want = min(ready) if ready else None
            assert (found is None) == (want is None)
            if found is None or want is None:
                continue
            assert found == (want[3], want[:3])
            if op == "take":
                q.pop(found[0])
                del live[found[1][2]]
            else:
                q.block(found[0], QuotaHold("held"), [("wk", cls_of(found[0]))])
                blocked.add(found[0])
        q.check()


def cls_of(key: ClassKey) -> int:
    return int(key[1])
