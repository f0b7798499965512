"""Issue 26 items 3 and 5: a node says how it isolates process tasks, a task cannot leave its
cgroup, and a node that cannot isolate runs only its owner's process tasks unless opted in.

Real coordinator, real client processes: as root (this suite runs as root), and as `nobody`
through `setpriv` (a client that is not root, as on a laptop). `gpumesh detect` runs as a
subprocess with the client's environment.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpu_client.executors.tree import cgroup_root
from gpu_client.policy import assign_refusal
from shared.protocol import Assign, NodePolicy
from tests.conftest import (
    ROOT,
    TEST_JOIN_TOKEN,
    LiveCoordinator,
    Proc,
    _base_env,
    wait_until,
)

Spawn = Callable[..., Proc]
NOBODY = 65534
CGROUPS = cgroup_root("auto") is not None  # a writable cgroup v2 here (root, not off)
needs_cgroups = pytest.mark.skipif(
    not CGROUPS, reason="no writable cgroup v2 hierarchy on this machine: nothing to escape")
needs_setpriv = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="running a client as `nobody` needs root and util-linux setpriv")


async def node_view(live: LiveCoordinator, name: str) -> dict[str, Any]:
    async def online() -> dict[str, Any] | None:
        r = await live.http.get("/mesh/nodes")
        assert r.status_code == 200, r.text
        n = r.json()["nodes"].get(name)
        return dict(n) if n and n["status"] != "offline" else None

    found: dict[str, Any] = await wait_until(online, 20, f"node {name} registered")
    return found


def detect_level(env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "gpumesh", "detect", "--json"], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    level: dict[str, str] = json.loads(out.stdout)["isolation"]
    return level


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory `nobody` may use (pytest's tmp_path is root's, 0700)."""
    d = Path(tempfile.mkdtemp(prefix="gpumesh-nobody-"))
    os.chmod(d, 0o755)
    os.chown(d, NOBODY, NOBODY)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def spawn_nobody(procs: list[Proc], tmp_path: Path, home: Path, name: str, url: str,
                 **env: str) -> Proc:
    """A real client process running as `nobody`: not root, so it cannot isolate tasks."""
    proc_env = _base_env(
        NODE_NAME=name, MESH_COORDINATOR_URL=url, GPU_ENABLED="false",
        MESH_WORK_DIR=str(home / f"work-{name}"), MESH_STATE_DIR=str(home / f"state-{name}"),
        MESH_RECONNECT_MAX_S="1", MESH_TOKEN=TEST_JOIN_TOKEN, MESH_EXECUTORS="process",
        HOME=str(home), **env)
    argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            sys.executable, "-m", "gpu_client"]
    proc = Proc(argv, proc_env, tmp_path / f"client-{name}.log")
    procs.append(proc.start())
    return proc


@pytest.fixture
def nobody_clients(tmp_path: Path) -> Iterator[list[Proc]]:
    procs: list[Proc] = []
    yield procs
    for p in procs:
        p.stop()


async def tenant_client(live: LiveCoordinator, tenant: str) -> httpx.AsyncClient:
    r = await live.http.post("/admin/tokens", json={"tenant": tenant, "role": "submit"})
    assert r.status_code == 200, r.text
    return httpx.AsyncClient(base_url=live.url, timeout=30,
                             headers={"Authorization": f"Bearer {r.json()['token']}"})


async def submit(c: httpx.AsyncClient, **body: Any) -> str:
    r = await c.post("/tasks/submit", json=body)
    assert r.status_code == 200, r.text
    task_id: str = r.json()["task_id"]
    return task_id


# --- what a node states -------------------------------------------------------------------


async def test_a_root_client_states_its_isolation_in_nodes_and_detect(
    coordinator: LiveCoordinator, spawn_client: Spawn
) -> None:
    full = spawn_client("iso-cg", coordinator.ws_url)
    off = spawn_client("iso-off", coordinator.ws_url, MESH_CGROUP="off")
    expected = "user+cgroup" if CGROUPS else "user"
    assert (await node_view(coordinator, "iso-cg"))["isolation"] == expected, full.output()
    assert (await node_view(coordinator, "iso-off"))["isolation"] == "user", off.output()
    assert detect_level(full.env)["level"] == expected
    without = detect_level(off.env)
    assert without["level"] == "user" and "MESH_CGROUP=off" in without["why"], without
    # ... and the client said so when it started
    await wait_until(lambda: "isolation user: no per-task cgroups" in off.output(), 20,
                     "the client without cgroups to say so at start")


# --- a node that cannot isolate ------------------------------------------------------------


def test_a_node_without_isolation_refuses_another_tenants_process_assign() -> None:
    """The client's own check (defence in depth behind placement), on a raw `assign`."""
    policy = NodePolicy(executors=["builtin", "process"], owner_tenant="default")
    theirs = Assign(task_id="t", attempt=1, task_type="custom", executor="process",
                    script="true", tenant="alice")
    mine = Assign(task_id="t", attempt=1, task_type="custom", executor="process",
                  script="true", tenant="default")
    assert "isolation none" in assign_refusal(policy, theirs)
    assert assign_refusal(policy, mine) == ""
    assert assign_refusal(NodePolicy(executors=["process"]), theirs) == ""  # user / opted in


@needs_setpriv
async def test_a_non_root_node_runs_its_owners_process_tasks_and_holds_other_tenants(
    coordinator: LiveCoordinator, nobody_clients: list[Proc], tmp_path: Path,
    nobody_dir: Path,
) -> None:
    live = coordinator
    laptop = spawn_nobody(nobody_clients, tmp_path, nobody_dir, "laptop", live.ws_url)
    view = await node_view(live, "laptop")
    assert view["isolation"] == "none", laptop.output()
    assert "process" in view["executors"], view  # `gpumesh up` as a user: works as before
    # the owner's (the default tenant's: auth off, or an admin) process task runs, as nobody
    mine = await live.submit(task_type="custom", script="id -u")
    doc = await live.wait_finished(mine, 30)
    assert doc["status"] == "completed" and doc["result"]["output"].strip() == str(NOBODY), doc
    # another tenant's is held: placement never sends it, and the reason names isolation
    alice = await tenant_client(live, "alice")
    try:
        theirs = await submit(alice, task_type="custom", script="echo ran-as-a-guest")

        async def held() -> str:
            r = await alice.get(f"/tasks/{theirs}")
            d = r.json()
            assert d["status"] == "queued", d
            return str(d.get("reason") or "")

        reason = await wait_until(held, 20, "a queued reason")
        assert "isolation none" in reason and "'default'" in reason, reason
        # the owner opts in: a node with MESH_ISOLATION=none runs every tenant's
        open_laptop = spawn_nobody(nobody_clients, tmp_path, nobody_dir, "laptop-open",
                                   live.ws_url, MESH_ISOLATION="none")
        assert (await node_view(live, "laptop-open"))["isolation"] == "none"
        doc = await live.wait_finished(theirs, 30)
        assert doc["status"] == "completed" and doc["node"] == "laptop-open", (
            doc, open_laptop.output())
    finally:
        await alice.aclose()
    assert "process tasks of tenant 'default' (MESH_OWNER_TENANT) only" in laptop.output()


async def test_a_shared_user_node_holds_process_tasks_of_tenants_other_than_its_owner(
    coordinator: LiveCoordinator, spawn_client: Spawn
) -> None:
    """A root client with MESH_RUN_AS (one user for all tasks) is `none` too; its owner
    named by MESH_OWNER_TENANT: the default tenant's task stays queued, naming isolation."""
    live = coordinator
    spawn_client("shared", live.ws_url, MESH_RUN_AS="nobody", MESH_OWNER_TENANT="lab")
    assert (await node_view(live, "shared"))["isolation"] == "none"
    task = await live.submit(task_type="custom", script="true")

    async def held() -> str:
        d = await live.task(task)
        assert d["status"] == "queued", d
        return str(d.get("reason") or "")

    reason = await wait_until(held, 20, "a queued reason")
    assert "isolation none" in reason and "'lab'" in reason, reason


# --- a task cannot leave its cgroup ---------------------------------------------------------


@needs_cgroups
@pytest.mark.parametrize("env", [
    pytest.param({}, id="own-uid", marks=pytest.mark.skipif(
        importlib.util.find_spec("gpu_client.executors.uids") is None,
        reason="a uid per attempt (issue 26 item 1) is not in this tree")),
    pytest.param({"MESH_RUN_AS": "nobody"}, id="run-as"),
])
async def test_a_task_cannot_move_itself_out_of_its_cgroup(
    coordinator: LiveCoordinator, spawn_client: Spawn, env: dict[str, str]
) -> None:
    """The task runs as a user that is not root (a uid of its own from MESH_TASK_UIDS, or
    MESH_RUN_AS=nobody): the client placed it in its cgroup, and it can write neither the
    parent's nor the hierarchy root's `cgroup.procs`, nor make a cgroup of its own."""
    root = cgroup_root("auto")
    assert root is not None
    mount = root
    while (mount.parent / "cgroup.procs").exists() and mount != mount.parent:
        mount = mount.parent
    live = coordinator
    spawn_client("cg", live.ws_url, **env)
    script = (
        "cat /proc/self/cgroup | grep '^0::'; id -u; "
        f"for cg in {mount} {root}; do "
        "  if echo $$ > $cg/cgroup.procs 2>/dev/null; then echo ESCAPED-TO:$cg; fi; "
        "done; "
        f"mkdir {root}/mine 2>/dev/null && echo MADE-A-CGROUP; "
        "grep '^0::' /proc/self/cgroup"
    )
    task = await live.submit(task_type="custom", script=script)
    doc = await live.wait_finished(task, 30)
    out = doc["result"]["output"]
    assert doc["status"] == "completed", doc
    assert "ESCAPED" not in out and "MADE-A-CGROUP" not in out, out
    rel = "/" + str(root.relative_to(mount))
    lines = [ln for ln in out.splitlines() if ln.startswith("0::")]
    assert len(lines) == 2 and all(ln.startswith(f"0::{rel}/") for ln in lines), out
    assert lines[0] == lines[1], out  # still in its own cgroup at the end
    uid = int(out.splitlines()[1])
    assert uid == NOBODY if env else 60000 <= uid <= 60999, out
