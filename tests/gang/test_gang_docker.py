"""Docker gang members (issue 28 item 3): a member's container shares its node's network, so
the MASTER_PORT rank 0's node found free on the host is reachable by its peers."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import docker
import pytest

from gpu_client.executors.docker_spec import LABEL_NODE, container_spec
from gpu_client.gang import with_rendezvous
from shared.protocol import Assign, GangRun
from tests.conftest import LiveCoordinator, Proc, wait_until
from tests.docker_images import busybox_image, requires_docker
from tests.gang import task_uids

Spawn = Callable[..., Proc]


def _member(rank: int, port: int = 0) -> Assign:
    run = GangRun(gang_id="g1", rank=rank, nnodes=2, gpus_per_node=0, master_addr="10.0.0.5",
                  master_port=port, node_addrs=["10.0.0.5", "10.0.0.6"])
    return Assign(task_id=f"m{rank}", attempt=1, task_type="custom", executor="docker",
                  image="img:1", env={"MASTER_PORT": "1", "A": "b"}, gang=run)


def test_a_gang_members_container_uses_host_networking_and_the_rendezvous() -> None:
    a, found = with_rendezvous(_member(0))  # rank 0: its node finds the port
    assert 0 < found < 65536
    spec = container_spec(a, "n0", [])
    assert spec["network_mode"] == "host" and "ports" not in spec
    env = spec["environment"]
    assert env["MASTER_ADDR"] == "10.0.0.5" and env["MASTER_PORT"] == str(found)
    assert (env["NODE_RANK"], env["NNODES"], env["WORLD_SIZE"]) == ("0", "2", "2")
    assert env["GPUMESH_NODE_ADDRS"] == "10.0.0.5,10.0.0.6" and env["A"] == "b"
    other, none = with_rendezvous(_member(1, found))
    assert none == 0
    spec1 = container_spec(other, "n1", [])
    assert spec1["network_mode"] == "host"
    assert spec1["environment"]["MASTER_PORT"] == str(found)
    assert spec1["environment"]["NODE_RANK"] == "1"
    # a task that is no gang member keeps docker's default network
    plain = container_spec(Assign(task_id="t", attempt=1, task_type="custom",
                                  executor="docker", image="img:1"), "n0", [])
    assert "network_mode" not in plain


@pytest.fixture
def nodes() -> Iterator[list[str]]:
    """Node names no other test uses; their containers are removed afterwards."""
    names = [f"gd{i}-{uuid.uuid4().hex[:6]}" for i in range(2)]
    yield names
    client = docker.from_env()
    try:
        for name in names:
            for c in client.containers.list(all=True, filters={"label": f"{LABEL_NODE}={name}"}):
                c.remove(force=True)
    finally:
        client.close()


# rank 0 listens on MASTER_PORT on the host; rank 1 connects to MASTER_ADDR:MASTER_PORT until
# rank 0 is there, and sends its rank
_TALK = ('if [ "$NODE_RANK" = 0 ]; then echo "listening on $MASTER_PORT"; '
         'exec nc -l -p "$MASTER_PORT"; fi; '
         'i=0; until echo "hello from rank $NODE_RANK" | nc -w 1 "$MASTER_ADDR" "$MASTER_PORT"; '
         'do i=$((i+1)); [ $i -gt 300 ] && exit 9; sleep 0.2; done')


class TestDocker:
    pytestmark = requires_docker()

    async def test_rank_1s_container_reaches_rank_0s_port(
        self, coordinator: LiveCoordinator, spawn_client: Spawn, nodes: list[str]
    ) -> None:
        image = busybox_image()
        for i, name in enumerate(nodes):
            spawn_client(name, coordinator.ws_url, MESH_EXECUTORS="docker",
                         MESH_NODE_ADDRESS="127.0.0.1", MESH_TASK_UIDS=task_uids(i))
        mesh = coordinator.mesh
        await wait_until(lambda: all(n in mesh.nodes and mesh.nodes[n].online for n in nodes),
                         20, "both docker nodes online")
        gang = await coordinator.submit(task_type="custom", image=image, nodes=2,
                                        command=["sh", "-c", _TALK], timeout_s=90)
        done = await coordinator.wait_finished(gang, 90)
        assert done["status"] == "completed", done
        out0 = done["result"]["output"]
        port = done["result"]["output"].split("listening on ")[1].split()[0]
        assert 0 < int(port) < 65536
        assert "hello from rank 1" in out0, out0  # rank 1 reached rank 0 through the host
        assert [r["exit_code"] for r in done["result"]["ranks"]] == [0, 0]
        assert {r["node"] for r in done["result"]["ranks"]} == set(nodes)
