"""The coordinator's settings: one frozen value, read from flags and env in one place."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypedDict

from shared.config import ConfigError, env_bool, env_float, env_int, env_list, env_str

# The balancing modes MESH_BALANCING may name; placement scores each (scheduling/placement.py).
MODES = ("speed", "efficiency", "balanced", "endurance")
# The queue policies MESH_POLICY may name (coordinator/scheduling/policy.py says what each does).
POLICIES = ("priority", "fifo", "backfill", "sef")


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "0.0.0.0"
    port: int = 8001
    data_dir: Path = Path("./mesh-data")
    name: str = "gpumesh"
    token: str = ""  # the join token nodes present; "" = the one in <data-dir>/join.token
    join_token_file: Path | None = None  # where a generated join token goes; None: <data-dir>
    tls_cert: Path | None = None  # with tls_key: serve HTTPS and WSS
    tls_key: Path | None = None
    heartbeat_interval_s: float = 5.0
    node_timeout_s: float = 15.0  # silence after which a node is lost
    reconnect_grace_s: float = 10.0  # a closed socket's tasks wait this long for the node
    restart_grace_s: float = 30.0  # after a coordinator restart, running tasks wait this long
    # Deadlines the coordinator keeps (coordinator/core/deadlines.py): a running task ends as
    # timed out this long after its timeout_s (the node reports its own timeout first); an
    # assigned task not started this long after its assignment (an image pull: the client
    # gives up on one after 600 s) is taken back as its node's fault.
    timeout_grace_s: float = 120.0
    start_deadline_s: float = 900.0
    register_timeout_s: float = 10.0
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API; none
    auth: str = "token"  # token | off (MESH_AUTH=off: anyone who can reach the port is admin)
    admin_token: str = ""  # MESH_ADMIN_TOKEN; else one is generated into <data-dir>/admin.token
    metrics_token_file: Path | None = None  # MESH_METRICS_TOKEN_FILE: a read token, mode 0644
    sqlite_synchronous: str = "NORMAL"  # WAL + NORMAL survives kill -9; FULL survives power loss
    store: str = "sqlite"  # MESH_STORE / --store: sqlite (in data_dir) | postgresql://... URL
    finished_cache: int = 10_000
    log_bytes_per_task: int = 256 * 1024
    max_wait_s: float = 300.0  # the longest `?wait=` a request may hold
    balancing: str = "balanced"  # speed | efficiency | balanced | endurance
    aging_s: float = 600.0  # a queued task gains one priority level per this many seconds
    policy: str = "priority"  # MESH_POLICY: priority | fifo | backfill | sef (scheduling/policy.py)
    templates: Path | None = None  # task-type templates (TOML); None: the packaged defaults
    # Limits (README "Limits"): each refusal names the limit it hit.
    max_body_bytes: int = 4 << 20  # a request body over this is refused (413) while streaming
    max_queued: int = 2_000_000  # queued tasks; a submission over it gets 429 + Retry-After
    max_connections: int = 20_000  # node WebSockets; more are closed with 1013
    # Sockets that have not sent their first frame; one more pushes the oldest out (1013).
    max_unregistered: int = 64
    http_head_timeout_s: float = 5.0  # a request head not complete this long: connection closed
    max_http_pending: int = 1024  # connections without a complete head; more are closed at once
    max_log_followers: int = 1000  # concurrent `logs?follow`; more get 429
    ws_queue_frames: int = 10_000  # frames queued to one node; a peer that does not read
    ws_queue_bytes: int = 64 << 20  # ... past either bound is closed with 4005
    forget_node_s: float = 3600.0  # an offline node holding no tasks is forgotten after this
    max_infra_retries: int = 20  # node-fault requeues of one task before it fails
    gang_ready_s: float = 300.0  # every member of a gang started within this, or all stop
    quarantine_errors: int = 3  # infrastructure errors within the window that quarantine a node
    quarantine_window_s: float = 600.0
    quarantine_probe_s: float = 30.0  # a quarantined node's healthy heartbeat lifts it after this
    stall_s: float = 1.0  # event-loop lag that counts as the coordinator's own stall
    # mDNS (coordinator/leader/advertise.py): on only when read from the environment
    # (MESH_ADVERTISE,
    # default on), so an app built in-process, as tests do, announces nothing.
    mdns: bool = False
    mesh_name: str = ""  # MESH_NAME: what nodes choose a mesh by; "": the coordinator's name
    mdns_addresses: tuple[str, ...] = ()  # advertise these instead of the bound addresses
    lease_s: float = 10.0  # PostgreSQL: the leader lease; a standby leads this long after
    advertise_url: str = ""  # how peers and nodes reach this coordinator; "": from host/port
    # Model services (coordinator/core/services.py): a replica that ends while wanted is
    # restarted after service_restart_s, doubled per consecutive crash up to the max; at most
    # max_services services in all (a create past it gets 409).
    service_restart_s: float = 1.0
    service_restart_max_s: float = 60.0
    max_services: int = 1000
    service_ready_s: float = 900.0  # a replica placed but not ready this long is restarted
    service_unhealthy_s: float = 60.0  # a replica unhealthy this long, unbroken, is replaced
    # Tenants (coordinator/scheduling/tenants.py): defaults for a tenant without a stored config
    # (0 = unlimited), the fair-share half-life, and preemption of low work by critical work.
    tenant_default_weight: float = 1.0
    tenant_default_max_gpus: int = 0
    tenant_default_max_running: int = 0
    tenant_default_max_queued: int = 0
    tenant_default_rate: float = 0.0  # submissions per second
    tenant_default_burst: int = 0  # 0: the rate, rounded up
    tenant_default_max_nonpreemptible: int = 0
    fairshare_halflife_s: float = 3600.0
    preemption: bool = False  # MESH_PREEMPTION=on
    preempt_grace_s: float = 5.0  # SIGTERM to the end of a preempted task's hold
    artifact_retention_s: float = 7 * 86400.0  # a finished task's artifacts are kept this long
    # Bytes of artifacts kept under <data-dir>/artifacts/ in all (uploads in flight count); an
    # upload past it gets 507. 10 GiB: 320 attempts at the per-attempt maximum (32 MiB), far
    # more at usual sizes, and small beside a disk that holds a week of them (retention).
    artifacts_max_bytes: int = 10 << 30
    fast_lane: bool = True  # MESH_FAST_LANE=off: every request through the full stack
    # The OpenAI-compatible /v1 (coordinator/web/openai.py, coordinator/link/streams.py):
    # how long a request waits for a first ready replica (then 503 + Retry-After), open
    # streams in all and per node (then 503), each stream's window (the bytes a node may
    # send beyond what the caller took: the stream's buffer bound), the request body cap
    # (at most the protocol's MAX_STREAM_BODY) and the wait for a replica's response head.
    serve_cold_start_s: float = 120.0
    serve_max_streams: int = 1024
    serve_max_streams_per_node: int = 256
    serve_window_bytes: int = 256 << 10
    serve_max_body_bytes: int = 512 << 10
    serve_head_timeout_s: float = 600.0

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: object) -> Settings:
        d = cls()
        base = cls(
            host=env_str(env, "MESH_HOST", d.host),
            port=env_int(env, "MESH_PORT", d.port),
            data_dir=Path(env_str(env, "MESH_DATA_DIR", str(d.data_dir))),
            name=env_str(env, "NODE_NAME", d.name),
            token=env_str(env, "MESH_JOIN_TOKEN", "") or env_str(env, "MESH_TOKEN", ""),
            join_token_file=(
                Path(env["MESH_JOIN_TOKEN_FILE"]) if env.get("MESH_JOIN_TOKEN_FILE") else None
            ),
            tls_cert=Path(env["MESH_TLS_CERT"]) if env.get("MESH_TLS_CERT") else None,
            tls_key=Path(env["MESH_TLS_KEY"]) if env.get("MESH_TLS_KEY") else None,
            heartbeat_interval_s=env_float(env, "MESH_HEARTBEAT_S", d.heartbeat_interval_s),
            node_timeout_s=env_float(env, "MESH_NODE_TIMEOUT_S", d.node_timeout_s),
            reconnect_grace_s=env_float(env, "MESH_RECONNECT_GRACE_S", d.reconnect_grace_s),
            restart_grace_s=env_float(env, "MESH_RESTART_GRACE_S", d.restart_grace_s),
            timeout_grace_s=env_float(env, "MESH_TIMEOUT_GRACE_S", d.timeout_grace_s),
            start_deadline_s=env_float(env, "MESH_START_DEADLINE_S", d.start_deadline_s),
            cors_origins=env_list(env, "MESH_CORS_ORIGINS", d.cors_origins),
            auth=env_str(env, "MESH_AUTH", d.auth).lower(),
            admin_token=env_str(env, "MESH_ADMIN_TOKEN", ""),
            metrics_token_file=(
                Path(env["MESH_METRICS_TOKEN_FILE"]) if env.get("MESH_METRICS_TOKEN_FILE") else None
            ),
            sqlite_synchronous=env_str(env, "MESH_SQLITE_SYNC", d.sqlite_synchronous).upper(),
            store=env_str(env, "MESH_STORE", d.store),
            balancing=env_str(env, "MESH_BALANCING", d.balancing),
            aging_s=env_float(env, "MESH_AGING_S", d.aging_s),
            policy=env_str(env, "MESH_POLICY", d.policy).lower(),
            templates=Path(env["MESH_TEMPLATES"]) if env.get("MESH_TEMPLATES") else None,
            max_body_bytes=env_int(env, "MESH_MAX_BODY_BYTES", d.max_body_bytes),
            max_queued=env_int(env, "MESH_MAX_QUEUED", d.max_queued),
            max_connections=env_int(env, "MESH_MAX_CONNECTIONS", d.max_connections),
            max_unregistered=env_int(env, "MESH_MAX_UNREGISTERED", d.max_unregistered),
            register_timeout_s=env_float(env, "MESH_REGISTER_TIMEOUT_S", d.register_timeout_s),
            http_head_timeout_s=env_float(env, "MESH_HTTP_HEAD_TIMEOUT_S", d.http_head_timeout_s),
            max_http_pending=env_int(env, "MESH_MAX_HTTP_PENDING", d.max_http_pending),
            max_log_followers=env_int(env, "MESH_MAX_LOG_FOLLOWERS", d.max_log_followers),
            ws_queue_frames=env_int(env, "MESH_WS_QUEUE_FRAMES", d.ws_queue_frames),
            ws_queue_bytes=env_int(env, "MESH_WS_QUEUE_BYTES", d.ws_queue_bytes),
            forget_node_s=env_float(env, "MESH_FORGET_NODE_S", d.forget_node_s),
            max_infra_retries=env_int(env, "MESH_MAX_INFRA_RETRIES", d.max_infra_retries),
            gang_ready_s=env_float(env, "MESH_GANG_READY_S", d.gang_ready_s),
            quarantine_errors=env_int(env, "MESH_QUARANTINE_ERRORS", d.quarantine_errors),
            quarantine_window_s=env_float(env, "MESH_QUARANTINE_WINDOW_S", d.quarantine_window_s),
            quarantine_probe_s=env_float(env, "MESH_QUARANTINE_PROBE_S", d.quarantine_probe_s),
            stall_s=env_float(env, "MESH_STALL_S", d.stall_s),
            mdns=env_bool(env, "MESH_ADVERTISE", True),
            fast_lane=env_bool(env, "MESH_FAST_LANE", True),
            mesh_name=env_str(env, "MESH_NAME", d.mesh_name),
            mdns_addresses=env_list(env, "MESH_MDNS_ADDRESSES", d.mdns_addresses),
            lease_s=env_float(env, "MESH_LEASE_S", d.lease_s),
            advertise_url=env_str(env, "MESH_ADVERTISE_URL", d.advertise_url),
            service_restart_s=env_float(env, "MESH_SERVICE_RESTART_S", d.service_restart_s),
            service_restart_max_s=env_float(env, "MESH_SERVICE_RESTART_MAX_S",
                                            d.service_restart_max_s),
            max_services=env_int(env, "MESH_MAX_SERVICES", d.max_services),
            service_ready_s=env_float(env, "MESH_SERVICE_READY_S", d.service_ready_s),
            service_unhealthy_s=env_float(env, "MESH_SERVICE_UNHEALTHY_S",
                                          d.service_unhealthy_s),
            **_tenant_env(env, d),
            artifact_retention_s=env_float(env, "MESH_ARTIFACT_RETENTION_S",
                                           d.artifact_retention_s),
            artifacts_max_bytes=env_int(env, "MESH_ARTIFACTS_MAX_BYTES", d.artifacts_max_bytes),
            **_serve_env(env, d),
        )
        if base.auth not in ("token", "off"):
            raise ConfigError("MESH_AUTH", base.auth, "token | off")
        if not base.timeout_grace_s >= 0:
            raise ConfigError("MESH_TIMEOUT_GRACE_S", f"{base.timeout_grace_s:g}", "seconds >= 0")
        if not base.gang_ready_s > 0:
            raise ConfigError("MESH_GANG_READY_S", f"{base.gang_ready_s:g}", "seconds > 0")
        if not base.start_deadline_s > 0:
            raise ConfigError("MESH_START_DEADLINE_S", f"{base.start_deadline_s:g}", "seconds > 0")
        if base.balancing not in MODES:
            raise ConfigError("MESH_BALANCING", base.balancing, " | ".join(MODES))
        if base.policy not in POLICIES:
            raise ConfigError("MESH_POLICY", base.policy, " | ".join(POLICIES))
        store = str(overrides.get("store") or base.store)
        if store != "sqlite" and not store.startswith(("postgresql://", "postgres://")):
            raise ConfigError("MESH_STORE", store, "sqlite | postgresql://user@host/db")
        if not base.artifacts_max_bytes > 0:
            raise ConfigError("MESH_ARTIFACTS_MAX_BYTES", str(base.artifacts_max_bytes),
                              "bytes > 0")
        fields = {k: v for k, v in overrides.items() if v is not None}
        return replace(base, **fields)  # type: ignore[arg-type]

class _TenantEnv(TypedDict):
    tenant_default_weight: float
    tenant_default_max_gpus: int
    tenant_default_max_running: int
    tenant_default_max_queued: int
    tenant_default_rate: float
    tenant_default_burst: int
    tenant_default_max_nonpreemptible: int
    fairshare_halflife_s: float
    preemption: bool
    preempt_grace_s: float


def _tenant_env(env: Mapping[str, str], d: Settings) -> _TenantEnv:
    """MESH_TENANT_DEFAULT_*, MESH_FAIRSHARE_HALFLIFE_S, MESH_PREEMPTION(_GRACE_S)."""
    pre = "MESH_TENANT_DEFAULT_"
    weight = env_float(env, pre + "WEIGHT", d.tenant_default_weight)
    if not weight > 0:
        raise ConfigError(pre + "WEIGHT", str(weight), "a number above 0")
    return {
        "tenant_default_weight": weight,
        "tenant_default_max_gpus": env_int(env, pre + "MAX_GPUS", 0),
        "tenant_default_max_running": env_int(env, pre + "MAX_RUNNING", 0),
        "tenant_default_max_queued": env_int(env, pre + "MAX_QUEUED", 0),
        "tenant_default_rate": env_float(env, pre + "RATE", 0.0),
        "tenant_default_burst": env_int(env, pre + "BURST", 0),
        "tenant_default_max_nonpreemptible": env_int(env, pre + "MAX_NONPREEMPTIBLE", 0),
        "fairshare_halflife_s": env_float(env, "MESH_FAIRSHARE_HALFLIFE_S",
                                          d.fairshare_halflife_s),
        "preemption": env_bool(env, "MESH_PREEMPTION", False),
        "preempt_grace_s": env_float(env, "MESH_PREEMPT_GRACE_S", d.preempt_grace_s),
    }


class _ServeEnv(TypedDict):
    serve_cold_start_s: float
    serve_max_streams: int
    serve_max_streams_per_node: int
    serve_window_bytes: int
    serve_max_body_bytes: int
    serve_head_timeout_s: float


def _serve_env(env: Mapping[str, str], d: Settings) -> _ServeEnv:
    """MESH_SERVE_*: the limits of the OpenAI-compatible /v1 (README "Limits")."""
    from shared.protocol import MAX_STREAM_BODY

    def count(name: str, default: int, low: int = 1, high: int = 1 << 30) -> int:
        value = env_int(env, name, default)
        if not low <= value <= high:
            raise ConfigError(name, str(value), f"an integer from {low} to {high}")
        return value

    def seconds(name: str, default: float) -> float:
        value = env_float(env, name, default)
        if not value > 0:
            raise ConfigError(name, f"{value:g}", "seconds > 0")
        return value

    return {
        "serve_cold_start_s": seconds("MESH_SERVE_COLD_START_S", d.serve_cold_start_s),
        "serve_max_streams": count("MESH_SERVE_MAX_STREAMS", d.serve_max_streams),
        "serve_max_streams_per_node": count("MESH_SERVE_MAX_STREAMS_PER_NODE",
                                            d.serve_max_streams_per_node),
        "serve_window_bytes": count("MESH_SERVE_WINDOW_BYTES", d.serve_window_bytes,
                                    high=1 << 30),
        "serve_max_body_bytes": count("MESH_SERVE_MAX_BODY_BYTES", d.serve_max_body_bytes,
                                      high=MAX_STREAM_BODY),
        "serve_head_timeout_s": seconds("MESH_SERVE_HEAD_TIMEOUT_S", d.serve_head_timeout_s),
    }
