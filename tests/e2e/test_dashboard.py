"""The Grafana dashboard against real data: every panel's PromQL returns something.

Grafana cannot be installed here, so the test does what Grafana would: a real coordinator,
a real client (fake GPUs), a second node that reports full GPU telemetry over a real
WebSocket, a real Prometheus scraping `/metrics` every second with our alert rules loaded,
then each panel target of `profiles/grafana/dashboards/gpumesh.json` as an instant query.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from tests.conftest import ADMIN_HEADERS, TEST_JOIN_TOKEN, free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "profiles/grafana/dashboards/gpumesh.json"
DATASOURCES = ROOT / "profiles/grafana/provisioning/datasources/prometheus.yml"
PROVIDERS = ROOT / "profiles/grafana/provisioning/dashboards/gpumesh.yml"
ALERTS = ROOT / "profiles/prometheus/alerts.yml"
DATASOURCE_UID = "gpumesh-prom"

# What the coordinator exposes at GET /metrics (coordinator/core/metrics.py): the names the
# dashboard and the alerts may use. Histograms add _bucket, _sum and _count.
GAUGES = {
    "gpumesh_nodes",
    "gpumesh_node_up",
    "gpumesh_gpus_total",
    "gpumesh_vram_total_bytes",
    "gpumesh_vram_used_bytes",
    "gpumesh_gpu_memory_total_bytes",
    "gpumesh_gpu_memory_used_bytes",
    "gpumesh_gpu_utilization_percent",
    "gpumesh_gpu_temperature_celsius",
    "gpumesh_gpu_power_watts",
    "gpumesh_queue_depth",
    "gpumesh_tasks",
    "gpumesh_ws_connections",
    "gpumesh_service_replicas",
    "gpumesh_service_replicas_desired",
}
COUNTERS = {
    "gpumesh_tasks_submitted_total",
    "gpumesh_tasks_finished_total",
    "gpumesh_reassignments_total",
    "gpumesh_stale_messages_total",
    "gpumesh_service_requests_total",
    "gpumesh_service_errors_total",
    "gpumesh_service_completion_tokens_total",
    "gpumesh_service_scale_events_total",
}
HISTOGRAMS = {
    "gpumesh_task_wait_seconds",
    "gpumesh_task_run_seconds",
    "gpumesh_dispatch_latency_seconds",
    "gpumesh_store_write_seconds",
    "gpumesh_service_ttft_seconds",
}
CONTRACT = (
    GAUGES | COUNTERS | {h + suffix for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
)

# Grafana's variables, as an instant query in this test reads them.
VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "10m",
    "${node}": ".*",
    "$node": ".*",
}

needs_metrics = pytest.mark.skipif(
    not (ROOT / "coordinator/core/metrics.py").exists(),
    reason="coordinator/core/metrics.py does not exist yet: the coordinator serves no /metrics",
)
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="no `prometheus` binary (Debian package `prometheus`)",
)


def load_dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def all_panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in doc["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def panel_targets(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables filled in) for every target."""
    out = []
    for panel in all_panels(doc):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in VARIABLES.items():
                expr = expr.replace(var, value)
            out.append((panel["title"], expr))
    return out


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bgpumesh_[a-z_]+\b", expr))


# --- the files alone -------------------------------------------------------------------------


def test_dashboard_uses_only_contract_metrics() -> None:
    targets = panel_targets(load_dashboard())
    assert len(targets) >= 30
    used = set().union(*(metric_names(expr) for _, expr in targets))
    assert used <= CONTRACT, f"not exposed by the coordinator: {sorted(used - CONTRACT)}"
    # every metric of the contract is on the dashboard somewhere
    shown = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    families = GAUGES | COUNTERS | HISTOGRAMS
    assert families <= shown, f"not on the dashboard: {sorted(families - shown)}"
    leftover = [expr for _, expr in targets if "$" in expr]
    assert not leftover, f"a Grafana variable this test does not fill: {leftover}"


def test_alert_rules_use_only_contract_metrics() -> None:
    used = metric_names(ALERTS.read_text())
    assert used and used <= CONTRACT, sorted(used - CONTRACT)


def test_dashboard_is_wired_to_the_provisioned_datasource() -> None:
    doc = load_dashboard()
    assert re.search(rf"^\s+uid: {DATASOURCE_UID}$", DATASOURCES.read_text(), re.M)
    assert "path: /etc/grafana/dashboards" in PROVIDERS.read_text()
    ids = [p["id"] for p in all_panels(doc)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in all_panels(doc):
        if panel["type"] in ("row", "alertlist"):
            continue
        sources = [panel["datasource"], *(t["datasource"] for t in panel["targets"])]
        assert all(s == {"type": "prometheus", "uid": DATASOURCE_UID} for s in sources), panel
    (node_var,) = [v for v in doc["templating"]["list"] if v["name"] == "node"]
    assert node_var["datasource"]["uid"] == DATASOURCE_UID
    assert node_var["includeAll"] and node_var["allValue"] == ".*"
    titles = {p["title"] for p in all_panels(doc)}
    assert {
        "Nodes online",
        "GPU utilisation",
        "Task wait: submit to assignment",
        "Alert rules",
        "Alerts firing or pending",
    } <= titles


# --- against a live mesh and a real Prometheus -------------------------------------------------


class TelemetryNode:
    """A node that reports temperature, power and a nearly full GPU (fake GPUs report
    neither), offers no executor (so it is never assigned work), and registers with a task it
    cannot hold (so the coordinator refuses a stale message). It speaks the real protocol."""

    def __init__(self, ws_url: str, name: str) -> None:
        from shared.protocol import GpuInfo

        self.url, self.name = f"{ws_url}/ws/{name}", name
        self.gpus = [
            GpuInfo(
                index=0,
                name="H100",
                vendor="nvidia",
                uuid="GPU-synthetic-0",
                memory_total_mb=81_920,
                memory_used_mb=78_000,
                utilization_pct=97.0,
                temperature_c=74.0,
                power_w=612.5,
                power_limit_w=700.0,
            ),
            GpuInfo(
                index=1,
                name="H100",
                vendor="nvidia",
                uuid="GPU-synthetic-1",
                memory_total_mb=81_920,
                memory_used_mb=4_096,
                utilization_pct=12.5,
                temperature_c=41.0,
                power_w=95.0,
                power_limit_w=700.0,
            ),
        ]
        self.registered = threading.Event()
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"node-{name}", daemon=True)

    def __enter__(self) -> TelemetryNode:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(10)

    def _run(self) -> None:
        from websockets.exceptions import WebSocketException
        from websockets.sync.client import connect

        from shared.protocol import Heartbeat, Register, TaskRef

        try:
            with connect(self.url) as ws:
                ws.send(
                    msgspec.json.encode(
                        Register(
                            hostname=self.name,
                            gpus=self.gpus,
                            cpu_count=8,
                            memory_mb=65_536,
                            executors=[],
                            running=[TaskRef(task_id="ghost-task", attempt=1)],
                            token=TEST_JOIN_TOKEN,
                        )
                    ).decode()
                )
                reply = json.loads(ws.recv(timeout=10))
                assert reply["type"] == "registered", reply
                self.registered.set()
                while not self.stopping.is_set():
                    try:
                        ws.recv(timeout=0.5)  # cancel/error for the ghost task: read and drop
                    except TimeoutError:
                        ws.send(msgspec.json.encode(Heartbeat(gpus=self.gpus)).decode())
        except (OSError, ValueError, AssertionError, WebSocketException) as exc:
            # reported by the test, not lost in a thread
            self.error = exc


class Prometheus:
    def __init__(self, tmp: Path, target: str, port: int, token_file: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.config = tmp / "prometheus.yml"
        self.config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {ALERTS}\n"
            "scrape_configs:\n  - job_name: gpumesh-coordinator\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
            f"    authorization:\n      credentials_file: {token_file}\n"
        )
        self.log = tmp / "prometheus.log"
        self.argv = [
            shutil.which("prometheus") or "prometheus",
            f"--config.file={self.config}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ]
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Prometheus:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{self.log.read_text()[-3000:]}")
        try:
            return self.http.get("/-/ready").status_code == 200
        except httpx.TransportError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        resp = self.http.get("/api/v1/query", params={"query": expr})
        body = resp.json()
        assert resp.status_code == 200 and body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None


@pytest.mark.slow
@needs_metrics
@needs_prometheus
def test_every_panel_query_returns_data(
    tmp_path: Path,
    spawn_coordinator: Callable[..., Any],
    spawn_client: Callable[..., Any],
) -> None:
    port = free_port()
    # a read token for Prometheus, written by the coordinator as in the monitoring profile
    scrape_token = tmp_path / "metrics" / "token"
    coordinator = spawn_coordinator(
        port, tmp_path / "mesh-data", MESH_METRICS_TOKEN_FILE=str(scrape_token)
    )
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=40, headers=ADMIN_HEADERS)

    def healthy() -> bool:
        if coordinator.popen.poll() is not None:
            raise AssertionError(f"coordinator exited:\n{coordinator.output()[-3000:]}")
        try:
            return api.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    def online(name: str) -> Callable[[], bool]:
        return lambda: (
            api.get("/mesh/status").json()["nodes"].get(name, {}).get("status") == "online"
        )

    def run_tasks(bodies: list[dict[str, Any]]) -> list[str]:
        ids = [api.post("/tasks/submit", json=b).json()["task_id"] for b in bodies]
        return [api.get(f"/tasks/{i}", params={"wait": 30}).json()["status"] for i in ids]

    with api:
        wait_for(healthy, 20, "the coordinator's /health")
        client = spawn_client(
            "fake-a100", f"ws://127.0.0.1:{port}", GPU_ENABLED="true", MESH_FAKE_GPUS="2xA100-80GB"
        )
        wait_for(online("fake-a100"), 20, f"fake-a100 online; its log:\n{client.output()}")
        with (
            TelemetryNode(f"ws://127.0.0.1:{port}", "synthetic-h100") as node,
            Prometheus(tmp_path / "prom", f"127.0.0.1:{port}", free_port(), scrape_token) as prom,
        ):
            wait_for(lambda: node.registered.is_set() or node.error, 10, "synthetic node")
            assert node.error is None, node.error
            wait_for(prom.ready, 30, "prometheus ready")
            wait_for(
                lambda: prom.value('up{job="gpumesh-coordinator"}') == 1,
                30,
                "prometheus scraping the coordinator",
            )

            # A model service: its series (replicas by state, requests, TTFT) start at once.
            svc = {"name": "chat", "model": "tiny", "replicas": {"min": 1, "max": 1},
                   "command": ["python3", "-c", "import time; time.sleep(120)", "{port}"]}
            assert api.post("/services", json=svc).status_code == 201

            # Two waves: the first creates the counters' series, the second moves them, so
            # increase() and rate() (which miss a series' first value) see work and failures.
            fail = {"task_type": "custom", "script": "exit 3"}
            assert run_tasks([{"task_type": "test"}, fail]) == ["completed", "failed"]
            wait_for(
                lambda: prom.value('sum(gpumesh_tasks_finished_total{status="failed"})') == 1,
                20,
                "prometheus seeing the first wave",
            )
            statuses = run_tasks([{"task_type": "test"}] * 3 + [fail])
            assert statuses == ["completed"] * 3 + ["failed"]
            wait_for(
                lambda: prom.value('sum(gpumesh_tasks_finished_total{status="failed"})') == 2,
                20,
                "prometheus seeing the second wave",
            )

            # Every panel target returns data; retried until a shared deadline, since rate()
            # needs two samples after a change.
            pending = dict.fromkeys(panel_targets(load_dashboard()))
            deadline = time.monotonic() + 20
            while True:
                for title, expr in list(pending):
                    if prom.query(expr):
                        del pending[(title, expr)]
                if not pending or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert not pending, "panels with no data:\n" + "\n".join(
                f"  {title}: {expr}" for title, expr in pending
            )

            # The alert rules run against the real metric names: the failure rate (2 failed of
            # 6) and the nearly full GPU are pending (their `for` is minutes); nothing else.
            def active_alerts() -> set[tuple[str, str]]:
                rows = prom.query('ALERTS{alertstate=~"pending|firing"}')
                return {(r["metric"]["alertname"], r["metric"].get("node", "")) for r in rows}

            want = {("GpumeshTaskFailureRateHigh", ""), ("GpumeshGpuMemoryHigh", "synthetic-h100")}
            got = wait_for(
                lambda: (a := active_alerts()) >= want and a, 20, f"alerts {want} pending"
            )
            assert got == want
            assert node.error is None, node.error
