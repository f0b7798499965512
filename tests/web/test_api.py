"""The HTTP API against a real uvicorn: the seed's shapes, bad input, long-poll, cancel."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import LiveCoordinator


async def test_index_health_and_status_shapes(coordinator: LiveCoordinator) -> None:
    http = coordinator.http
    index = (await http.get("/")).json()
    assert index["name"] == "gpumesh" and "/tasks/submit" in index["links"].values()
    assert (await http.get("/health")).json()["status"] == "healthy"
    status = (await http.get("/mesh/status")).json()
    for key in ("coordinator", "total_nodes", "total_gpus", "total_vram", "active_tasks",
                "queued_tasks", "completed_tasks"):
        assert key in status, key
    assert status["nodes"] == {}
    assert (await http.get("/mesh/nodes")).json() == {"nodes": {}, "count": 0}


async def test_submit_is_queued_with_reason_when_no_node_fits(
    coordinator: LiveCoordinator,
) -> None:
    # The seed's llm_inference example on a mesh without GPUs: accepted, stays queued.
    task_id = await coordinator.submit(
        task_type="llm_inference", model="llama2-7b", prompt="hi", priority=7,
        requirements={"gpu_count": 1, "memory_gb": 16},
    )
    doc = await coordinator.task(task_id)
    assert doc["status"] == "queued" and doc["priority"] == 7
    assert "no node" in doc["reason"]
    active = (await coordinator.http.get("/tasks/active")).json()
    assert task_id in active["tasks"]  # the seed's poll loop relies on this shape
    assert active["tasks"][task_id]["status"] == "queued"


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "invalid JSON"),
        (b'{"task_type": "nope"}', 422, "$.task_type"),
        (b'{"priority": 5}', 422, "task_type"),
        (b'{"task_type": "test", "priority": 11}', 422, "$.priority"),
        (b'{"task_type": "test", "priority": "high"}', 422, "Expected `int`"),
        (b'{"task_type": "custom"}', 422, "script"),
        (b'{"task_type": "custom", "script": "x", "command": ["y"]}', 422, "not both"),
        (b'{"task_type": "test", "requirements": {"gpu_count": -1}}', 422, "gpu_count"),
        (b'{"task_type": "test", "timeout_s": 0}', 422, "timeout_s"),
        (b"[]", 400, "1 to"),
        (b"[1]", 422, "item 0"),
        (b'"a string"', 422, "expected an object"),
    ],
)
async def test_bad_submissions_get_a_reason_and_change_nothing(
    coordinator: LiveCoordinator, body: bytes, status: int, needle: str
) -> None:
    r = await coordinator.http.post(
        "/tasks/submit", content=body, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == status, r.text
    doc = r.json()
    assert "error" in doc and needle in doc["error"] + doc["reason"]
    assert coordinator.mesh.tasks == {}


async def test_bad_query_parameters_and_unknown_ids(coordinator: LiveCoordinator) -> None:
    http = coordinator.http
    assert (await http.get("/tasks/completed", params={"limit": "x"})).status_code == 400
    assert (await http.get("/tasks/completed", params={"limit": "0"})).status_code == 400
    task_id = await coordinator.submit(task_type="test")
    r = await http.get(f"/tasks/{task_id}", params={"wait": "-1"})
    assert r.status_code == 400 and "wait" in r.json()["reason"]
    r = await http.get("/tasks/does-not-exist")
    assert r.status_code == 404 and r.json()["error"] == "unknown task"
    assert (await http.post("/tasks/does-not-exist/cancel")).status_code == 404
    assert (await http.get("/no/such/route")).status_code == 404
    assert (await http.put("/tasks/submit")).status_code == 405


async def test_batch_submit_returns_every_id(coordinator: LiveCoordinator) -> None:
    r = await coordinator.http.post(
        "/tasks/submit", json=[{"task_type": "test"}, {"task_type": "test", "priority": 9}]
    )
    assert r.status_code == 200
    ids = [t["task_id"] for t in r.json()["tasks"]]
    assert len(set(ids)) == 2 and set(ids) <= set(coordinator.mesh.tasks)


async def test_cancel_queued_then_cancel_again_conflicts(coordinator: LiveCoordinator) -> None:
    task_id = await coordinator.submit(task_type="test")
    r = await coordinator.http.post(f"/tasks/{task_id}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = await coordinator.http.delete(f"/tasks/{task_id}")
    assert r.status_code == 409 and "already cancelled" in r.json()["reason"]
    completed = (await coordinator.http.get("/tasks/completed")).json()
    assert completed["tasks"][task_id]["status"] == "cancelled" and completed["total"] == 1


async def test_wait_returns_at_the_deadline_with_the_current_state(
    coordinator: LiveCoordinator,
) -> None:
    task_id = await coordinator.submit(task_type="test")
    loop = asyncio.get_running_loop()
    started = loop.time()
    doc = await coordinator.task(task_id, wait=0.3)
    assert doc["status"] == "queued" and loop.time() - started >= 0.25


async def test_wait_answers_as_soon_as_the_task_finishes(coordinator: LiveCoordinator) -> None:
    task_id = await coordinator.submit(task_type="test")
    waiter = asyncio.create_task(coordinator.task(task_id, wait=30))
    await asyncio.sleep(0.1)
    await coordinator.http.post(f"/tasks/{task_id}/cancel")
    doc = await asyncio.wait_for(waiter, 5)
    assert doc["status"] == "cancelled"


async def test_completed_pages_newest_first(coordinator: LiveCoordinator) -> None:
    ids = [await coordinator.submit(task_type="test") for _ in range(5)]
    for task_id in ids:
        await coordinator.http.post(f"/tasks/{task_id}/cancel")
    first = (await coordinator.http.get("/tasks/completed", params={"limit": 2})).json()
    assert list(first["tasks"]) == ids[::-1][:2] and first["next_offset"] == 2
    rest = (await coordinator.http.get("/tasks/completed", params={"offset": 2})).json()
    assert list(rest["tasks"]) == ids[::-1][2:] and rest["next_offset"] is None
    assert rest["total"] == 5


async def test_cors_is_closed_by_default(coordinator: LiveCoordinator) -> None:
    r = await coordinator.http.options(
        "/tasks/submit",
        headers={"Origin": "http://example.org", "Access-Control-Request-Method": "POST"},
    )
    assert r.status_code == 400  # MESH_CORS_ORIGINS lists none: no origin may call the API
    assert "access-control-allow-origin" not in r.headers


async def test_metrics_exposes_the_mesh(coordinator: LiveCoordinator) -> None:
    await coordinator.submit(task_type="test", priority=9)
    text = (await coordinator.http.get("/metrics")).text
    assert 'gpumesh_queue_depth{band="critical"} 1.0' in text
    assert 'gpumesh_tasks_submitted_total{task_type="test"} 1.0' in text


async def test_template_types_are_filled_from_the_submission(
    coordinator: LiveCoordinator,
) -> None:
    task_id = await coordinator.submit(task_type="llm_inference", prompt="Hello")
    doc = await coordinator.task(task_id)
    assert doc["executor"] == "docker" and doc["image"].startswith("vllm/")
    assert doc["requirements"] == {"gpu_count": 1, "memory_gb": 16}  # the template's
    t = coordinator.mesh.tasks[task_id]
    assert t.spec.env["PROMPT"] == "Hello" and t.spec.env["MODEL"]
    r = await coordinator.http.post("/tasks/submit", json={"task_type": "llm_inference"})
    assert r.status_code == 200  # the template's default prompt
    r = await coordinator.http.post(
        "/tasks/submit", json={"task_type": "llm_inference", "promt": "typo"}
    )
    assert r.status_code == 422 and "did you mean `prompt`" in r.json()["reason"]
