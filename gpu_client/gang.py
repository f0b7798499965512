"""A gang member's rendezvous on the node (issue 28): the env torchrun reads, and a free port.

The coordinator sends a gang's rank 0 its `assign` first, with `master_port` 0: this node
finds a free port, runs rank 0 with it and reports it in `task_accepted`; the other ranks'
assigns then carry it. Every member gets, in its environment:

    MASTER_ADDR, MASTER_PORT, NODE_RANK, NNODES, WORLD_SIZE (= NNODES x GPUS_PER_NODE, or
    NNODES when the gang asks no GPUs), GPUS_PER_NODE, GPUMESH_NODE_ADDRS (every member's
    address in rank order, comma-separated), GPUMESH_GANG_ID

so `torchrun --nnodes=$NNODES --node_rank=$NODE_RANK --master_addr=$MASTER_ADDR
--master_port=$MASTER_PORT --nproc_per_node=...` runs as written. These names win over the
task's own `env` (a task cannot point its peers elsewhere).
"""

from __future__ import annotations

import socket

import msgspec

from shared.protocol import Assign, GangRun

GANG_VARS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "NNODES", "WORLD_SIZE",
             "GPUS_PER_NODE", "GPUMESH_NODE_ADDRS", "GPUMESH_GANG_ID")


def free_port(address: str = "") -> int:
    """A TCP port free on this node now (the kernel's pick), for rank 0's MASTER_PORT. The
    socket is closed before the task binds it: a race with another process is possible, and
    then the gang's attempt fails and is retried as one unit."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        return int(s.getsockname()[1])


def gang_env(g: GangRun) -> dict[str, str]:
    per_node = g.gpus_per_node
    return {
        "MASTER_ADDR": g.master_addr,
        "MASTER_PORT": str(g.master_port),
        "NODE_RANK": str(g.rank),
        "NNODES": str(g.nnodes),
        "WORLD_SIZE": str(g.nnodes * per_node if per_node else g.nnodes),
        "GPUS_PER_NODE": str(per_node),
        "GPUMESH_NODE_ADDRS": ",".join(g.node_addrs),
        "GPUMESH_GANG_ID": g.gang_id,
    }


def with_rendezvous(a: Assign, address: str = "") -> tuple[Assign, int]:
    """The assign with its gang env filled in, and the port to report (rank 0 found it;
    0 for the other ranks). An assign that is no gang member comes back as it is."""
    g = a.gang
    if g is None:
        return a, 0
    found = 0
    if g.rank == 0 and not g.master_port:
        found = free_port(address or g.master_addr)
        g = msgspec.structs.replace(g, master_port=found)
    return msgspec.structs.replace(a, gang=g, env={**a.env, **gang_env(g)}), found
