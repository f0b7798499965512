"""ClientSettings.from_env: defaults, URL normalisation, and errors that name the variable."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from gpu_client.settings import ClientSettings, normalize_url
from shared.config import ConfigError


def test_defaults() -> None:
    s = ClientSettings.from_env({})
    assert s.node_name == socket.gethostname()
    assert s.role == "compute"
    assert s.coordinator_url == "ws://localhost:8001"
    assert s.ws_url == f"ws://localhost:8001/ws/{s.node_name}"
    assert s.gpu_enabled is True
    assert s.executors == ("builtin", "docker")  # the process executor is opt-in
    assert s.allowed_images == ("*",) and s.allowed_volumes == () and s.run_as == ""
    assert s.ca_file is None and s.state_dir.name == "gpumesh"
    assert s.slots == (os.cpu_count() or 1)
    assert s.labels == {} and s.token == ""
    assert s.work_dir == Path(f"/tmp/gpumesh-work/{s.node_name}")
    assert s.reconnect_max_s == 10.0
    assert s.output_tail_bytes == 16 * 1024


def test_everything_set() -> None:
    s = ClientSettings.from_env(
        {
            "NODE_NAME": "gpu-a.1", "NODE_ROLE": "lead", "MESH_COORDINATOR_URL": "https://c:8443/",
            "GPU_ENABLED": "false", "MESH_EXECUTORS": "docker, process,builtin,docker",
            "MESH_SLOTS": "3", "MESH_LABELS": "zone=eu, owner=lab", "MESH_TOKEN": " t0k ",
            "MESH_WORK_DIR": "/var/lib/gm", "MESH_RECONNECT_MAX_S": "2.5",
            "MESH_OUTPUT_TAIL_BYTES": "100",
        }
    )
    assert s.node_name == "gpu-a.1" and s.role == "lead"
    assert s.coordinator_url == "wss://c:8443"
    assert s.gpu_enabled is False
    assert s.executors == ("builtin", "docker", "process")
    assert s.slots == 3 and s.labels == {"zone": "eu", "owner": "lab"} and s.token == "t0k"
    assert s.work_dir == Path("/var/lib/gm")
    assert s.reconnect_max_s == 2.5 and s.output_tail_bytes == 100


def test_policy_and_identity_settings(tmp_path: Path) -> None:
    s = ClientSettings.from_env({
        "MESH_STATE_DIR": str(tmp_path), "MESH_CA_FILE": "/etc/gm/ca.pem",
        "MESH_ALLOWED_IMAGES": "ghcr.io/lab/*, python:3.11-slim",
        "MESH_ALLOWED_VOLUMES": "/data/models,hf-cache", "MESH_FORBIDDEN_ENV": "AWS_*",
        "MESH_DOCKER_CAPS": "sys_ptrace", "MESH_RUN_AS": "nobody",
    })
    assert s.state_dir == tmp_path and s.ca_file == Path("/etc/gm/ca.pem")
    assert s.allowed_images == ("ghcr.io/lab/*", "python:3.11-slim")
    assert s.allowed_volumes == ("/data/models", "hf-cache") and s.forbidden_env == ("AWS_*",)
    assert s.docker_caps == ("SYS_PTRACE",) and s.run_as == "nobody"
    assert ClientSettings.from_env({"XDG_STATE_HOME": "/x"}).state_dir == Path("/x/gpumesh")
    name_file = tmp_path / "hostname"
    name_file.write_text("rack1-h100-3\n")
    assert ClientSettings.from_env({"MESH_NODE_NAME_FILE": str(name_file)}).node_name == (
        "rack1-h100-3"
    )
    assert ClientSettings.from_env(
        {"NODE_NAME": "n", "MESH_NODE_NAME_FILE": str(name_file)}
    ).node_name == "n"
    with pytest.raises(ConfigError):
        ClientSettings.from_env({"MESH_ALLOWED_VOLUMES": "data/models"})
    with pytest.raises(ConfigError):
        ClientSettings.from_env({"NODE_NAME": "x" * 64})


@pytest.mark.parametrize(
    ("raw", "url"),
    [
        ("ws://h:8001", "ws://h:8001"),
        ("ws://h:8001/", "ws://h:8001"),
        ("ws://h:8001/ws", "ws://h:8001"),
        ("ws://h:8001/ws/", "ws://h:8001"),
        ("http://h:8001", "ws://h:8001"),
        ("HTTPS://h/mesh/ws", "wss://h/mesh"),
        ("wss://h", "wss://h"),
        ("", "ws://localhost:8001"),
    ],
)
def test_url_normalisation(raw: str, url: str) -> None:
    assert normalize_url(raw) == url


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MESH_COORDINATOR_URL", "ftp://h"),
        ("MESH_COORDINATOR_URL", "h:8001"),
        ("MESH_COORDINATOR_URL", "ws://"),
        ("GPU_ENABLED", "maybe"),
        ("MESH_SLOTS", "many"),
        ("MESH_SLOTS", "0"),
        ("MESH_EXECUTORS", "process,kubernetes"),
        ("MESH_LABELS", "zone"),
        ("MESH_RECONNECT_MAX_S", "-1"),
        ("MESH_RECONNECT_MAX_S", "soon"),
        ("NODE_NAME", "a/b"),
        ("NODE_ROLE", "boss"),
        ("MESH_OUTPUT_TAIL_BYTES", "-5"),
    ],
)
def test_bad_values_name_their_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        ClientSettings.from_env({name: value})
    assert err.value.name == name
    assert name in str(err.value)
