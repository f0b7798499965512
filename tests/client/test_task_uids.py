"""Task uids are claimed host-wide: two clients on one machine never hand one uid to two
attempts (ending one attempt's uid would kill the other's processes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gpu_client.executors.uids import UidPool


def test_two_clients_on_one_host_never_share_a_task_uid(tmp_path: Path) -> None:
    a, b = UidPool(60000, 60002, tmp_path), UidPool(60000, 60002, tmp_path)
    assert a.take("t1-1") == 60000
    assert b.take("t2-1") == 60001  # a holds 60000 host-wide
    assert a.take("t3-1") == 60002
    a.free("t1-1")
    assert b.take("t4-1") == 60000  # given back: free for anyone again


def test_a_dead_clients_claims_are_let_go(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from gpu_client.executors.uids import UidPool; "
        f"p = UidPool(60000, 60001, Path({str(tmp_path)!r})); print(p.take('x-1'), flush=True); "
        "sys.stdin.readline()"
    )
    with subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True,
                          cwd=Path(__file__).parents[2]) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "60000"
            mine = UidPool(60000, 60001, tmp_path)
            assert mine.take("y-1") == 60001  # the other client holds 60000
            proc.kill()
            proc.wait(10)
            assert mine.take("z-1") == 60000  # its flock went with it
        finally:
            proc.kill()
