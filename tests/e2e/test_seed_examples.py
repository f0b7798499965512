"""Every task example of the seed guide users arrive with, byte for byte as it shows them.

`tests/fixtures/seed_aurora_guide.md` is the deployment guide, unedited. The examples are cut
out of it here (curl `-d` bodies, the JSON blocks, the Python and JavaScript clients), never
retyped, and sent as written with only a token header added. On a mesh without GPUs the GPU
examples wait queued with their reason; on one with simulated GPUs they run, with the
parameters the seed put inside `requirements` reaching the task.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from coordinator.settings import Settings
from tests.conftest import LiveCoordinator, Proc, run_coordinator, wait_until

GUIDE = Path(__file__).parents[1] / "fixtures" / "seed_aurora_guide.md"
Spawn = Callable[..., Proc]


def seed_examples() -> list[tuple[str, bytes]]:
    """(where, body) for every task submission in the guide, the body as its bytes."""
    text = GUIDE.read_text(encoding="utf-8")
    found: list[tuple[str, bytes]] = []
    for m in re.finditer(r"curl -X POST \S+/tasks/submit.*?-d '(.*?)'", text, re.S):
        found.append((f"curl at line {_line(text, m.start())}", m.group(1).encode()))
    for m in re.finditer(r"```json\n(\{.*?\})\n```", text, re.S):
        if '"task_type"' in m.group(1):
            found.append((f"json at line {_line(text, m.start())}", m.group(1).encode()))
    for m in re.finditer(r"requests\.post\([^,]+, json=(\{.*?\n\})\)", text, re.S):
        body = ast.literal_eval(m.group(1))  # a Python dict literal, as requests sends it
        found.append((f"python at line {_line(text, m.start())}", json.dumps(body).encode()))
    for m in re.finditer(r"body: JSON\.stringify\((\{.*?\n  \})\)", text, re.S):
        found.append((f"javascript at line {_line(text, m.start())}", _js_object(m.group(1))))
    return found


def _line(text: str, at: int) -> int:
    return text.count("\n", 0, at) + 1


def _js_object(src: str) -> bytes:
    """What JSON.stringify makes of a JS object literal with bare keys and '-quoted strings."""
    quoted = re.sub(r"([{,]\s*)([A-Za-z_]\w*)\s*:", r'\1"\2":', src).replace("'", '"')
    return json.dumps(json.loads(quoted)).encode()


EXAMPLES = seed_examples()
IDS = [where for where, _ in EXAMPLES]


def test_the_guide_holds_every_kind_of_example() -> None:
    kinds = [json.loads(body)["task_type"] for _, body in EXAMPLES]
    assert sorted(set(kinds)) == ["custom", "embeddings", "llm_inference", "test", "training"]
    assert len(EXAMPLES) == 8, IDS  # 2 curl, 4 JSON blocks, the Python and the JS client


async def _submit(live: LiveCoordinator, body: bytes) -> str:
    r = await live.http.post(
        "/tasks/submit", content=body, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 200, r.text
    task_id: str = r.json()["task_id"]
    return task_id


@pytest.mark.parametrize(("where", "body"), EXAMPLES, ids=IDS)
async def test_accepted_and_queued_with_a_reason_on_a_mesh_without_gpus(
    coordinator: LiveCoordinator, spawn_client: Spawn, where: str, body: bytes
) -> None:
    spawn_client(  # as `gpumesh up` starts its local client
        "cpu", coordinator.ws_url, MESH_EXECUTORS="process,docker",
        MESH_ALLOWED_VOLUMES="/var/cache/gpumesh",
    )
    await wait_until(
        lambda: "docker" in getattr(coordinator.mesh.nodes.get("cpu"), "executors", ()),
        30, "node cpu online with its docker executor",
    )
    spec = json.loads(body)
    task_id = await _submit(coordinator, body)
    if spec["task_type"] == "test":
        assert (await coordinator.wait_finished(task_id))["status"] == "completed"
        return
    doc = await coordinator.task(task_id)
    assert doc["status"] == "queued", doc
    assert "GPU" in doc["reason"], doc["reason"]  # why it waits: no node has the GPU
    active = (await coordinator.http.get("/tasks/active")).json()["tasks"]
    assert task_id in active  # the seed's client polls this until the id is gone
    for key, value in spec["requirements"].items():  # placement keys, or parameters
        assert doc["requirements"].get(key, doc["params"].get(key)) == value, key


# With simulated GPUs the template types run a stand-in of the real template through the
# process executor, printing what the real one would be given (the images are not here).
STAND_INS = r"""
[llm_inference]
image = "not-pulled"
command = ["sh", "-c", "echo llm \"$MODEL\" '|' \"$PROMPT\""]
env = { MODEL = "{model}", PROMPT = "{prompt}", MAX_TOKENS = "{max_tokens}" }
[llm_inference.params]
model = "Qwen/Qwen2.5-0.5B-Instruct"
prompt = "default prompt"
max_tokens = 256
[llm_inference.requirements]
gpu_count = 1
memory_gb = 16
executor = "process"

[training]
image = "not-pulled"
command = ["sh", "-c", "echo train \"$MODEL\" epochs \"$EPOCHS\""]
env = { MODEL = "{model}", EPOCHS = "{epochs}", BATCH_SIZE = "{batch_size}" }
[training.params]
model = "resnet18"
epochs = 1
batch_size = 64
[training.requirements]
gpu_count = 1
memory_gb = 8
executor = "process"

[embeddings]
image = "not-pulled"
command = ["sh", "-c", "echo embed \"$TEXTS\" batch \"$BATCH_SIZE\""]
env = { MODEL = "{model}", TEXTS = "{texts}", BATCH_SIZE = "{batch_size}" }
[embeddings.params]
model = "sentence-transformers/all-MiniLM-L6-v2"
texts = ["one text"]
batch_size = 8
[embeddings.requirements]
gpu_count = 1
memory_gb = 4
executor = "process"
"""

EXPECTED_OUTPUT = {  # what each example's stand-in prints: the seed's parameters arrived
    "llm_inference": r"^llm (Qwen/Qwen2\.5-0\.5B-Instruct|llama-70b) \| default prompt$",
    "training": r"^train resnet18 epochs 10$",
    "embeddings": r'^embed \["one text"\] batch 32$',
}


@pytest.mark.parametrize(("where", "body"), EXAMPLES, ids=IDS)
async def test_runs_on_a_mesh_with_simulated_gpus(
    tmp_path: Path, settings: Settings, spawn_client: Spawn, where: str, body: bytes
) -> None:
    stand_ins = tmp_path / "templates.toml"
    stand_ins.write_text(STAND_INS)
    async with run_coordinator(replace(settings, templates=stand_ins)) as live:
        spawn_client(
            "rig", live.ws_url, GPU_ENABLED="true", MESH_FAKE_GPUS="2xRTX4090-24GB@nvidia"
        )
        await wait_until(lambda: "rig" in live.mesh.nodes, 20, "node rig online")
        spec: dict[str, Any] = json.loads(body)
        doc = await live.wait_finished(await _submit(live, body), timeout=30)
        assert doc["node"] == "rig" and doc["attempt"] == 1, doc
        if spec["task_type"] == "custom":
            # The seed names a script file it does not send: the task runs, and what it
            # reports names the missing file (send it in `files`, see the README).
            assert doc["status"] == "failed" and doc["result"]["exit_code"] == 127, doc
            assert "train_model.py is not in the task's working dir" in json.dumps(doc), doc
            assert doc["attempt"] == 1  # the task's own outcome: not retried, not the node's
            return
        assert doc["status"] == "completed", doc
        if spec["task_type"] in EXPECTED_OUTPUT:
            out = doc["result"]["output"].strip()
            assert re.match(EXPECTED_OUTPUT[spec["task_type"]], out), out
            if spec["requirements"].get("gpu_count"):
                assert len(doc["gpu_indices"]) == spec["requirements"]["gpu_count"]


async def test_a_misspelt_requirement_is_refused_with_the_valid_keys(
    coordinator: LiveCoordinator,
) -> None:
    for task_type in ("training", "custom", "test"):
        body = {"task_type": task_type, "requirements": {"gpu_cout": 4}, "script": "true"}
        if task_type == "training":
            del body["script"]
        r = await coordinator.http.post("/tasks/submit", json=body)
        assert r.status_code == 422, r.text
        reason = r.json()["reason"]
        assert "`gpu_cout`" in reason and "did you mean `gpu_count`" in reason, reason
        assert "memory_gb" in reason  # the valid requirement keys are listed
    r = await coordinator.http.post("/tasks/submit", json={"task_type": "inference"})
    assert r.status_code == 422
    assert "llm_inference, training, embeddings, custom, test" in r.json()["reason"]
    assert not coordinator.mesh.tasks  # nothing was stored
