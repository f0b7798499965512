"""Gang tasks (issue 28): several real clients on one machine run one gang."""

import os


def task_uids(i: int) -> str:
    """A uid range of client `i`'s own (MESH_TASK_UIDS): a root client ends whatever runs under
    a task's uid when it stops it, and these "nodes" share one machine (real nodes do not)."""
    base = 61000 + (os.getpid() % 400) * 10 + i * 3
    return f"{base}-{base + 2}"
