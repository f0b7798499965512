"""The simulator's engine (coordinator/sim/engine.py): a hand-worked trace, exact per policy.

Three nodes of 4 GPUs (A, B, C: gpu-0-0000, -0001, -0002), one tenant, estimates exact.
Placement is the live code's `balanced` mode: among nodes that fit, the one with the most
free GPUs; among equals, the one that has had that many free the longest (the index's
bucket order). What each policy does differently, by job (submit s, duration s, GPUs):

  1 (0, 100, 4)  2 (0, 50, 2)  3 (0, 200, 3)   A, B, C: all three start at 0
  4 (1, 10, 4)   the head: fits nowhere until 2 ends at 50 (B has 4 free then)
  5 (2, 100, 2)  fits on B now. fifo: behind 4. backfill: B is reserved for 4 at 50 and
                 5 would hold 2 of its GPUs past then: held (until 60, after 4).
                 priority: nothing is reserved: starts at 2, and 4 waits until 100.
  6 (3, 40, 1)   backfill: ends at 43 <= 50: passes on B. priority: C (B is full).
  7 (4, 500, 1)  backfill: runs past 50 but on C, not the reserved B: passes.
  8 (5, 10, 1)   backfill: ends at 15: passes on B.
  9 (6, 30, 2)   priority 7 (the others 5): first in the queue under `priority` only.
 10 (7, 20, 1), 11 (8, 60, 4), 12 (9, 5, 1)

The expected starts are worked out in the comments of each table.
"""

from __future__ import annotations

import pytest

from coordinator.sim.engine import POLICIES, NodeGroup, SimJob, simulate

A, B, C = "gpu-0-0000", "gpu-0-0001", "gpu-0-0002"
CLUSTER = [NodeGroup(3, 4, "")]
TRACE = [
    SimJob(str(n), submit, duration, gpus, "a", priority=7 if n == 9 else 5)
    for n, (submit, duration, gpus) in enumerate([
        (0, 100, 4), (0, 50, 2), (0, 200, 3), (1, 10, 4), (2, 100, 2), (3, 40, 1),
        (4, 500, 1), (5, 10, 1), (6, 30, 2), (7, 20, 1), (8, 60, 4), (9, 5, 1),
    ], start=1)
]

EXPECTED: dict[str, dict[str, tuple[float, str]]] = {
    # 4 blocks everything until 2 ends (50); then 5 blocks until 4 ends (60): 5, 6, 8 on B,
    # 7 on C; 9 waits for A (100, with 6's end) and 10 goes to B (2 free since 100, listed
    # before A's 2 left after 9); 11 waits for A (130, 9's end), 12 then on B.
    "fifo": {
        "1": (0, A), "2": (0, B), "3": (0, C), "4": (50, B), "5": (60, B), "6": (60, B),
        "7": (60, C), "8": (60, B), "9": (100, A), "10": (100, B), "11": (130, A),
        "12": (130, B),
    },
    # Classes that do not fit are parked; the rest flow: 5 at 2 (B), 6 at 3 (C); 9 (priority
    # 7) first whenever room frees: at 50 on B (2's end); 7 at 43 on C (6's end); 8 and 10
    # at 80 (9's end) on B, 12 at 90 (8's end); 4 only at 100 on A (1's end), 11 at 102
    # (5's end, B empty).
    "priority": {
        "1": (0, A), "2": (0, B), "3": (0, C), "4": (100, A), "5": (2, B), "6": (3, C),
        "7": (43, C), "8": (80, B), "9": (50, B), "10": (80, B), "11": (102, B),
        "12": (90, B),
    },
    # 4 is reserved B at 50. 5 held (B, past 50, no spare); 6 (ends 43), 8 (ends 15) pass on
    # B; 7 passes on C; 10 at 15 (8's end, ends 35), 12 at 35 (ends 40) pass on B. At 43 5
    # fits B again but is held again. 4 at 50; 5 and 9 at 60 (4's end) on B; 11 on A at 100.
    "backfill": {
        "1": (0, A), "2": (0, B), "3": (0, C), "4": (50, B), "5": (60, B), "6": (3, B),
        "7": (4, C), "8": (5, B), "9": (60, B), "10": (15, B), "11": (100, A),
        "12": (35, B),
    },
    # Ranks: submit + duration - 600 x priority. At 0, 2 (rank -2950) goes before 1 (-2900)
    # and takes A; 1 gets B. Parked classes flow as under `priority`, the shortest first:
    # 5 at 2 (A), 6 at 3 (C); at 43 (6's end) 12 (-2986) before 8 (-2985), 10, 7: 12 on C,
    # 8 at 48, 10 at 58, 7 at 78 (each at the one before's end); 9 at 50 on A (2's end);
    # 4 at 100 on B (1's end), 11 at 102 on A (5's end).
    "sef": {
        "1": (0, B), "2": (0, A), "3": (0, C), "4": (100, B), "5": (2, A), "6": (3, C),
        "7": (78, C), "8": (48, C), "9": (50, A), "10": (58, C), "11": (102, A),
        "12": (43, C),
    },
}


@pytest.mark.parametrize("policy", POLICIES)
def test_a_hand_worked_trace_starts_each_job_where_and_when_worked_out(policy: str) -> None:
    result = simulate(TRACE, CLUSTER, policy)
    starts = {r.job.id: (r.start_s, r.node) for r in result.records}
    assert starts == EXPECTED[policy]
    for r in result.records:
        assert r.end_s == r.start_s + r.job.duration_s
    assert result.total_gpus == 12 and result.skipped == {} and result.policy == policy
