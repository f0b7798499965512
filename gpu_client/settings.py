"""The compute client's settings: read from the environment once, in one place, then passed in."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shared.config import (
    ConfigError,
    env_bool,
    env_float,
    env_int,
    env_labels,
    env_list,
    env_str,
)
from shared.protocol import valid_node_name
from shared.tasks import EXECUTORS

DEFAULT_COORDINATOR_URL = "ws://localhost:8001"
_SCHEMES = {"ws://": "ws://", "wss://": "wss://", "http://": "ws://", "https://": "wss://"}


@dataclass(frozen=True, kw_only=True)
class ClientSettings:
    node_name: str
    role: str = "compute"
    coordinator_url: str = DEFAULT_COORDINATOR_URL  # ws:// or wss://, no trailing "/" or "/ws"
    coordinator_urls: tuple[str, ...] = ()  # every coordinator of the mesh (HA), in order
    gpu_enabled: bool = True
    executors: tuple[str, ...] = ("builtin", "docker")  # "builtin" always first
    slots: int = 1
    labels: dict[str, str] = field(default_factory=dict)
    node_address: str = ""  # MESH_NODE_ADDRESS: where a gang's peers reach this node
    token: str = ""
    work_dir: Path = Path("/tmp/gpumesh-work")
    reconnect_max_s: float = 10.0
    output_tail_bytes: int = 16 * 1024
    token_file: Path | None = None  # read the join token from here when MESH_TOKEN is unset
    state_dir: Path = Path("~/.local/state/gpumesh")  # the node's credential lives here
    ca_file: Path | None = None  # a private CA that signs the coordinator's certificate
    allowed_images: tuple[str, ...] = ("*",)  # globs a docker task's image must match
    allowed_volumes: tuple[str, ...] = ()  # host path prefixes bind mounts must lie under
    forbidden_env: tuple[str, ...] = ()  # names/globs refused on top of the hook list
    docker_caps: tuple[str, ...] = ()  # capabilities task containers keep (all others dropped)
    run_as: str = ""  # process tasks run as this user (the client must be root to switch)
    task_uids: tuple[int, int] = (60000, 60999)  # MESH_TASK_UIDS: a uid per attempt (root client)
    fence_after_s: float = 20.0  # cut off this long: stop all running work (0: never)
    cgroup: str = "auto"  # per-task cgroup v2 root: auto | off | a directory
    # MESH_ISOLATION=none: a node that cannot isolate process tasks runs every tenant's anyway
    isolation: str = "auto"  # auto | none
    owner_tenant: str = "default"  # MESH_OWNER_TENANT: whose process tasks a `none` node runs
    min_free_mb: int = 100  # less free disk in the work dir: the node reports itself unhealthy
    probe_interval_s: float = 30.0  # executors and node health are re-probed this often
    discover: bool = False  # no MESH_COORDINATOR_URL: find it by mDNS (gpu_client/discover.py)
    mesh_name: str = ""  # MESH_NAME: join the discovered mesh of this name ("": the only one)
    # model serving (gpu_client/serving.py): a ready replica's health is checked this often;
    # open streams and the bytes they may hold unacknowledged, node-wide
    serve_health_s: float = 5.0  # MESH_REPLICA_HEALTH_S
    serve_max_streams: int = 256  # MESH_NODE_MAX_STREAMS
    serve_buffer_mb: int = 256  # MESH_NODE_STREAM_BUFFER_MB

    @property
    def ws_url(self) -> str:
        """Where this node connects: `{coordinator_url}/ws/{node_name}`."""
        return f"{self.coordinator_url}/ws/{self.node_name}"

    @property
    def urls(self) -> tuple[str, ...]:
        """The coordinators to try, in turn: MESH_COORDINATOR_URL's comma-separated list."""
        return self.coordinator_urls or (self.coordinator_url,)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ClientSettings:
        """Read every knob; a bad value raises ConfigError naming its variable."""
        node_name = env_str(env, "NODE_NAME", "") or _name_from_file(env) or socket.gethostname()
        if not valid_node_name(node_name):
            raise ConfigError(
                "NODE_NAME", node_name, "1-63 letters, digits, '.', '_' or '-', starting with "
                "a letter or digit",
            )
        slots = env_int(env, "MESH_SLOTS", os.cpu_count() or 1)
        if slots < 1:
            raise ConfigError("MESH_SLOTS", str(slots), "a positive integer")
        reconnect_max_s = env_float(env, "MESH_RECONNECT_MAX_S", 10.0)
        if not reconnect_max_s > 0:
            raise ConfigError("MESH_RECONNECT_MAX_S", str(reconnect_max_s), "a positive number")
        tail = env_int(env, "MESH_OUTPUT_TAIL_BYTES", 16 * 1024)
        if tail < 0:
            raise ConfigError("MESH_OUTPUT_TAIL_BYTES", str(tail), "a non-negative integer")
        work_dir = env_str(env, "MESH_WORK_DIR", f"/tmp/gpumesh-work/{node_name}")
        fence_after_s = env_float(env, "MESH_FENCE_AFTER_S", 20.0)
        if fence_after_s < 0:
            raise ConfigError("MESH_FENCE_AFTER_S", str(fence_after_s), "0 (off) or seconds")
        min_free_mb = env_int(env, "MESH_MIN_FREE_MB", 100)
        probe_s = env_float(env, "MESH_PROBE_INTERVAL_S", 30.0)
        if min_free_mb < 0 or not probe_s > 0:
            raise ConfigError("MESH_MIN_FREE_MB/MESH_PROBE_INTERVAL_S", f"{min_free_mb}/{probe_s}",
                              "a non-negative integer / a positive number")
        return cls(
            node_name=node_name,
            role=_role(env),
            coordinator_url=(urls := normalize_urls(env_str(env, "MESH_COORDINATOR_URL", "")))[0],
            coordinator_urls=urls,
            gpu_enabled=env_bool(env, "GPU_ENABLED", True),
            executors=_executors(env),
            slots=slots,
            labels=env_labels(env, "MESH_LABELS"),
            node_address=_node_address(env),
            token=env.get("MESH_TOKEN", "").strip(),
            work_dir=Path(work_dir),
            reconnect_max_s=reconnect_max_s,
            output_tail_bytes=tail,
            token_file=Path(env["MESH_TOKEN_FILE"]) if env.get("MESH_TOKEN_FILE") else None,
            state_dir=_state_dir(env),
            ca_file=Path(env["MESH_CA_FILE"]) if env.get("MESH_CA_FILE", "").strip() else None,
            allowed_images=env_list(env, "MESH_ALLOWED_IMAGES", ("*",)),
            allowed_volumes=_volume_prefixes(env),
            forbidden_env=env_list(env, "MESH_FORBIDDEN_ENV", ()),
            docker_caps=tuple(c.upper() for c in env_list(env, "MESH_DOCKER_CAPS", ())),
            run_as=env_str(env, "MESH_RUN_AS", ""),
            task_uids=_task_uids(env),
            fence_after_s=fence_after_s,
            cgroup=env_str(env, "MESH_CGROUP", "auto"),
            isolation=_isolation(env),
            owner_tenant=env_str(env, "MESH_OWNER_TENANT", "default"),
            min_free_mb=min_free_mb,
            probe_interval_s=probe_s,
            discover=(not env_str(env, "MESH_COORDINATOR_URL", "")
                      and env_bool(env, "MESH_DISCOVERY", True)),
            mesh_name=env_str(env, "MESH_NAME", ""),
            **_serve(env),  # type: ignore[arg-type]  # each value is its field's type
        )


def _serve(env: Mapping[str, str]) -> dict[str, float | int]:
    health_s = env_float(env, "MESH_REPLICA_HEALTH_S", 5.0)
    streams = env_int(env, "MESH_NODE_MAX_STREAMS", 256)
    buffer_mb = env_int(env, "MESH_NODE_STREAM_BUFFER_MB", 256)
    if not 0 < health_s <= 3600 or not 1 <= streams <= 65536 or not 1 <= buffer_mb <= 65536:
        raise ConfigError("MESH_REPLICA_HEALTH_S/MESH_NODE_MAX_STREAMS/"
                          "MESH_NODE_STREAM_BUFFER_MB", f"{health_s}/{streams}/{buffer_mb}",
                          "seconds in (0, 3600] / 1-65536 streams / 1-65536 MiB")
    return {"serve_health_s": health_s, "serve_max_streams": streams,
            "serve_buffer_mb": buffer_mb}


def normalize_urls(raw: str) -> tuple[str, ...]:
    """`ws://a:8001, http://b:8001` -> both normalized, duplicates dropped, order kept."""
    urls = [normalize_url(part) for part in raw.split(",") if part.strip()]
    return tuple(dict.fromkeys(urls)) or (normalize_url(""),)


def normalize_url(raw: str) -> str:
    """`http://h:8001/ws/` -> `ws://h:8001`; https -> wss. Raises ConfigError otherwise."""
    url = raw.strip() or DEFAULT_COORDINATOR_URL
    for prefix, scheme in _SCHEMES.items():
        if url.lower().startswith(prefix):
            rest = url[len(prefix) :].rstrip("/")
            if rest.endswith("/ws"):
                rest = rest[: -len("/ws")].rstrip("/")
            if rest and not rest.startswith("/"):
                return scheme + rest
    raise ConfigError("MESH_COORDINATOR_URL", raw, "a ws://, wss://, http:// or https:// URL")


def _node_address(env: Mapping[str, str]) -> str:
    """MESH_NODE_ADDRESS: a host name or IP literal its gang peers reach it at ("": the
    coordinator uses the address this node connects from)."""
    address = env_str(env, "MESH_NODE_ADDRESS", "")
    if len(address) > 253 or not re.fullmatch(r"[A-Za-z0-9.:_\-\[\]%]*", address):
        raise ConfigError("MESH_NODE_ADDRESS", address[:80], "a host name or an IP address")
    return address


def _name_from_file(env: Mapping[str, str]) -> str:
    """The first line of MESH_NODE_NAME_FILE (compose mounts the host's /etc/hostname there)."""
    path = env_str(env, "MESH_NODE_NAME_FILE", "")
    if not path:
        return ""
    try:
        lines = Path(path).read_text().split()
    except OSError:
        return ""
    return lines[0] if lines else ""


def _state_dir(env: Mapping[str, str]) -> Path:
    """MESH_STATE_DIR, else $XDG_STATE_HOME/gpumesh, else ~/.local/state/gpumesh."""
    explicit = env_str(env, "MESH_STATE_DIR", "")
    if explicit:
        return Path(explicit).expanduser()
    xdg = env_str(env, "XDG_STATE_HOME", "")
    base = Path(xdg) if xdg else Path(env_str(env, "HOME", str(Path.home()))) / ".local/state"
    return base / "gpumesh"


def _volume_prefixes(env: Mapping[str, str]) -> tuple[str, ...]:
    prefixes = env_list(env, "MESH_ALLOWED_VOLUMES", ())
    for p in prefixes:
        path = p[:-3] if p.endswith((":ro", ":rw")) else p
        if (not path.startswith("/") and "/" in path) or ":" in path or not path:
            raise ConfigError("MESH_ALLOWED_VOLUMES", p,
                              "absolute host paths or volume names, each with `:rw` to allow "
                              "writes (read-only otherwise)")
    return prefixes


def _isolation(env: Mapping[str, str]) -> str:
    value = env_str(env, "MESH_ISOLATION", "auto").lower()
    if value not in ("auto", "none"):
        raise ConfigError("MESH_ISOLATION", value, "auto, or none (run every tenant's process "
                          "tasks on a node that cannot isolate them)")
    return value


def _task_uids(env: Mapping[str, str]) -> tuple[int, int]:
    raw = env_str(env, "MESH_TASK_UIDS", "60000-60999")
    try:
        return parse_uid_range(raw)
    except ValueError as exc:
        raise ConfigError("MESH_TASK_UIDS", raw, str(exc)) from None


def parse_uid_range(raw: str) -> tuple[int, int]:
    """`60000-60999` -> (60000, 60999). ValueError with the reason otherwise."""
    first_s, sep, last_s = raw.strip().partition("-")
    if not sep:
        raise ValueError("a range FIRST-LAST of numeric uids")
    try:
        first, last = int(first_s), int(last_s)
    except ValueError:
        raise ValueError("a range FIRST-LAST of numeric uids") from None
    if not 1 <= first <= last <= 2**31 - 2:
        raise ValueError("FIRST-LAST with 1 <= FIRST <= LAST < 2147483647 (never root)")
    if first <= 65534 <= last:
        raise ValueError("a range without 65534 (nobody: files of unmapped users show as it)")
    return first, last


def _role(env: Mapping[str, str]) -> str:
    role = env_str(env, "NODE_ROLE", "compute").lower()
    if role not in ("compute", "lead"):
        raise ConfigError("NODE_ROLE", role, "compute or lead")
    return role


def _executors(env: Mapping[str, str]) -> tuple[str, ...]:
    names = [n.lower() for n in env_list(env, "MESH_EXECUTORS", ("docker",))]
    for name in names:
        if name not in EXECUTORS:
            raise ConfigError("MESH_EXECUTORS", name, "a comma list of " + ", ".join(EXECUTORS))
    return ("builtin", *dict.fromkeys(n for n in names if n != "builtin"))
