"""Nodes that fail well (issue 11): a Docker daemon stopped and restarted under a node.

A private `dockerd` of its own (own socket, data root, exec root, pid file, its own bridge
interface, no iptables) runs under a real `python -m gpu_client`, so the machine's engine that
the other docker tests use is never touched. Stopping it must take `docker` out of what the
node offers (its heartbeats), a docker task submitted meanwhile must wait in the queue (not
fail, not be sent to the node), and once the daemon is back the node offers docker again and
the task completes there, its first attempt, never counted as a node fault.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest

from tests.conftest import LiveCoordinator, Proc, wait_for, wait_until
from tests.docker_images import BUSYBOX_IMAGE, _busybox, _rootfs_tar

log = logging.getLogger(__name__)
Spawn = Callable[..., Proc]


def _why_not() -> str:
    if shutil.which("dockerd") is None:
        return "no dockerd installed to run a private engine (apt-get install docker.io)"
    if os.geteuid() != 0:
        return "a private dockerd needs root"
    if shutil.which("ip") is None:
        return "no `ip` (iproute2) to give the private dockerd a bridge of its own"
    if _busybox() is None:
        return "no static busybox to build the test image (apt-get install busybox-static)"
    return ""


WHY_NOT = _why_not()
pytestmark = [
    pytest.mark.docker,
    pytest.mark.slow,
    pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT or "dockerd available"),
]


class PrivateDockerd:
    """A dockerd (and the containerd it supervises) of this test only, restartable in place."""

    def __init__(self, root: Path) -> None:
        self.root = root  # short: unix socket paths are limited to ~107 bytes
        self.sock = root / "d.sock"
        self.host = f"unix://{self.sock}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        # A bridge of its own: `--bridge=none` makes dockerd delete the host's docker0,
        # which took the machine's main engine's networking down for every later test.
        self.bridge = "gmb" + root.name[-8:]

    def _make_bridge(self) -> None:
        if Path(f"/sys/class/net/{self.bridge}").exists():
            return
        for argv in (["ip", "link", "add", self.bridge, "type", "bridge"],
                     ["ip", "addr", "add", "10.213.77.1/24", "dev", self.bridge],
                     ["ip", "link", "set", self.bridge, "up"]):
            subprocess.run(argv, check=True, capture_output=True, timeout=10)

    def start(self, timeout: float = 30) -> None:
        self._make_bridge()
        self.starts += 1
        argv = [
            "dockerd", "-H", self.host, "--data-root", str(self.root / "data"),
            "--exec-root", str(self.root / "x"), "--pidfile", str(self.root / "d.pid"),
            f"--bridge={self.bridge}", "--iptables=false", "--ip6tables=false",
        ]
        with (self.root / f"dockerd-{self.starts}.log").open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        wait_for(self._answers, timeout, f"the private dockerd answering on {self.sock}")

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"private dockerd exited {self.proc.returncode}:\n{self.log()}")
        r = subprocess.run(["docker", "-H", self.host, "info", "--format", "{{.ID}}"],
                           capture_output=True, timeout=10)
        return r.returncode == 0

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM, wait for dockerd to exit (it stops its containerd first)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.host, timeout=60)

    def log(self) -> str:
        return "".join(p.read_text(errors="replace")[-4000:]
                       for p in sorted(self.root.glob("dockerd-*.log")))

    def cleanup(self) -> None:
        self.stop()
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in self._leftover_pids():  # a containerd or shim it left behind, ours only
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for mount in reversed(self._mounts()):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=10)

    def _leftover_pids(self) -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(self.root).encode() + b"/" in cmdline:
                pids.append(int(entry.name))
        return pids

    def _mounts(self) -> list[str]:
        found = []
        for line in Path("/proc/self/mounts").read_text().splitlines():
            point = line.split()[1]
            if point.startswith(f"{self.root}/"):
                found.append(point)
        return found


@pytest.fixture
def private_dockerd() -> Iterator[PrivateDockerd]:
    engine = PrivateDockerd(Path(tempfile.mkdtemp(prefix="gmd", dir="/tmp")))
    try:
        engine.start()
        client = engine.client()
        try:
            repo, tag = BUSYBOX_IMAGE.split(":")
            busybox = _busybox()
            assert busybox is not None
            client.api.import_image_from_data(_rootfs_tar(busybox), repository=repo, tag=tag)
            client.images.get(BUSYBOX_IMAGE)
        finally:
            client.close()
        yield engine
    finally:
        engine.cleanup()


def offers_docker(live: LiveCoordinator, name: str) -> bool:
    node = live.mesh.nodes.get(name)
    return node is not None and node.online and "docker" in node.executors


async def test_docker_daemon_stopped_and_restarted_under_a_node(
    coordinator: LiveCoordinator, spawn_client: Spawn, private_dockerd: PrivateDockerd,
) -> None:
    name = "restart-" + private_dockerd.root.name[-6:]
    proc = spawn_client(name, coordinator.ws_url, DOCKER_HOST=private_dockerd.host,
                        MESH_EXECUTORS="docker", MESH_PROBE_INTERVAL_S="0.5")
    await wait_until(lambda: offers_docker(coordinator, name), 20, f"{name} offering docker")
    # A first task shows the private engine runs containers at all.
    warm = await coordinator.submit(task_type="custom", image=BUSYBOX_IMAGE, script="echo up")
    doc = await coordinator.wait_finished(warm, 30)
    assert doc["status"] == "completed", (doc, proc.output()[-3000:], private_dockerd.log())

    t0 = time.monotonic()
    private_dockerd.stop()
    stopped = time.monotonic()
    await wait_until(lambda: not offers_docker(coordinator, name), 20,
                     f"{name} no longer offering docker")
    lost_s = time.monotonic() - stopped
    node = coordinator.mesh.nodes[name]
    assert node.online and "docker" not in node.executors, node.executors

    task_id = await coordinator.submit(task_type="custom", image=BUSYBOX_IMAGE,
                                       script="echo $MESH_NODE $MESH_ATTEMPT")
    doc = await coordinator.task(task_id, wait=2)  # 4 probe intervals: it stays queued
    assert doc["status"] == "queued", doc  # waits: it does not fail
    assert "does not offer the docker executor" in doc["reason"], doc
    assert (doc["node"], doc["attempt"], doc["assigned_at"]) == (None, 0, None), doc  # not sent

    restarted = time.monotonic()
    private_dockerd.start()
    started = time.monotonic()
    await wait_until(lambda: offers_docker(coordinator, name), 20,
                     f"{name} offering docker again")
    back_s = time.monotonic() - started
    doc = await coordinator.wait_finished(task_id, 30)
    assert doc["status"] == "completed", (doc, proc.output()[-3000:])
    assert doc["node"] == name and doc["attempt"] == 1, doc
    assert doc["result"]["output"] == f"{name} 1\n", doc
    # Attempt 1 and no error: the restart was never an attempt of this task (a node-fault
    # requeue would have made a second one), nor a failure anywhere.
    assert not doc.get("error"), doc
    assert coordinator.mesh.finished_counts["failed"] == 0
    assert coordinator.mesh.finished_counts["completed"] == 2
    out = proc.output()
    assert "docker executor off" in out and "docker executor back" in out, out[-3000:]
    log.warning(
        "private dockerd: stopped in %.2fs; node stopped offering docker %.2fs after it "
        "exited; restart took %.2fs; docker offered again %.2fs after it answered",
        stopped - t0, lost_s, started - restarted, back_s,
    )
