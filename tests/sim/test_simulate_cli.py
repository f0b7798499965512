"""`gpumesh simulate` as a subprocess: --json keys, --compare, determinism, the files it
writes, one-line refusals, and --from-mesh against a real coordinator with real clients."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coordinator.sim.engine import POLICIES
from coordinator.sim.report import SUMMARY_KEYS
from tests.conftest import ROOT, LiveCoordinator, Proc, admin_token, free_port, wait_until

PHILLY = ROOT / "tests" / "fixtures" / "traces" / "philly.csv.gz"
TIMING = ("wall_s", "peak_rss_mb")  # the two figures that differ between identical runs


def plain_trace(tmp_path: Path, jobs: int = 40) -> Path:
    """Three tenants, sizes 1 to 4 GPUs, durations 30 to 600 s, arriving faster than 2x4
    GPUs can serve: a queue forms."""
    path = tmp_path / "trace.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["submit_time", "duration_s", "gpus", "tenant"])
        for i in range(jobs):
            w.writerow([i * 20, 30 + (i * 137) % 571, 1 + (i * 7) % 4, "abc"[i % 3]])
    return path


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "GPU_"))}
    return subprocess.run([sys.executable, "-m", "gpumesh", "simulate", *args], cwd=ROOT,
                          env=base | {"COLUMNS": "250"} | env, capture_output=True, text=True,
                          timeout=120)


def summaries(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


def test_json_one_object_per_policy_with_the_keys(tmp_path: Path) -> None:
    trace = plain_trace(tmp_path)
    res = run(str(trace), "--cluster", "2x4:V100", "--compare", "--estimate", "x2", "--json")
    assert res.returncode == 0, res.stderr
    docs = summaries(res.stdout)
    assert [d["policy"] for d in docs] == list(POLICIES)
    for d in docs:
        assert list(d)[: len(SUMMARY_KEYS)] == list(SUMMARY_KEYS)
        assert d["jobs"] == 40 and d["total_gpus"] == 8 and 0 < d["utilization"] <= 1
        assert 0 < d["jain"] <= 1 and d["p99_queue_s"] >= d["mean_queue_s"] >= 0
    fifo = run(str(trace), "--cluster", "2x4:V100", "--policy", "fifo", "--json")
    assert [d["policy"] for d in summaries(fifo.stdout)] == ["fifo"]
    two = run(str(trace), "--cluster", "2x4:V100", "--compare", "backfill,fifo", "--json")
    assert [d["policy"] for d in summaries(two.stdout)] == ["backfill", "fifo"]


def test_same_input_and_seed_same_output(tmp_path: Path) -> None:
    args = ["--limit", "300", "--cluster", "4x8:V100", "--compare", "--estimate",
            "lognormal:1.0", "--seed", "7", "--json"]
    first = run(str(PHILLY), *args, "--csv", str(tmp_path / "a.csv"))
    second = run(str(PHILLY), *args, "--csv", str(tmp_path / "b.csv"))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    strip = [[{k: v for k, v in d.items() if k not in TIMING} for d in summaries(r.stdout)]
             for r in (first, second)]
    assert strip[0] == strip[1]
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert all(d["jobs"] + d["skipped"] == 300 for d in strip[0])


def test_table_csv_and_report(tmp_path: Path) -> None:
    trace = plain_trace(tmp_path)
    out_csv, out_html = tmp_path / "jobs.csv", tmp_path / "report.html"
    res = run(str(trace), "--cluster", "2x4:V100", "--compare", "--csv", str(out_csv),
              "--report", str(out_html))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "trace: trace.csv (plain, 40 jobs)" in lines
    assert "cluster: 2x4:V100 (8 GPUs)" in lines
    header = next(line for line in lines if line.startswith("POLICY"))
    assert header.split()[:4] == ["POLICY", "JOBS", "MEAN", "JCT"]
    for policy in POLICIES:
        assert any(line.split()[:2] == [policy, "40"] for line in lines), res.stdout
    with out_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 40 * len(POLICIES)
    assert all(float(r["start_s"]) >= float(r["submit_s"]) for r in rows)
    page = out_html.read_text()
    assert page.count("<svg") == 4 and all(f"<th>{p}</th>" in page for p in POLICIES)


def one_line(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines[0].startswith("gpumesh: "), res.stderr
    return res.stderr


def test_bad_input_is_refused_with_a_reason(tmp_path: Path) -> None:
    trace = plain_trace(tmp_path, jobs=3)
    assert "group 1 '8y8' is not NODESxGPUS" in one_line(run(str(trace), "--cluster", "8y8"))
    assert "unknown policy lifo" in one_line(
        run(str(trace), "--cluster", "1x4", "--policy", "lifo"))
    assert "estimate 'x3'" in one_line(run(str(trace), "--cluster", "1x4", "--estimate", "x3"))
    bad = tmp_path / "bad.csv"
    bad.write_text("submit_time,duration_s,gpus,tenant\n0,10,1,a\n5,ten,1,a\n")
    err = one_line(run(str(bad), "--cluster", "1x4"))
    assert "1 bad row(s)" in err and "line 3: duration_s 'ten' is not a number" in err
    skipped = run(str(bad), "--cluster", "1x4", "--skip-bad", "--json")
    assert summaries(skipped.stdout)[0]["jobs"] == 1
    assert "cannot open" in one_line(run(str(tmp_path / "absent.csv"), "--cluster", "1x4"))
    assert "cannot write" in one_line(
        run(str(trace), "--cluster", "1x4", "--report", str(tmp_path / "no" / "r.html")))
    dead = f"http://127.0.0.1:{free_port()}"
    assert "is the coordinator running?" in one_line(run(str(trace), "--from-mesh", dead))


Spawn = Callable[..., Proc]


async def test_from_mesh_takes_the_cluster_of_a_live_mesh(
    coordinator: LiveCoordinator, spawn_client: Spawn, tmp_path: Path
) -> None:
    live = coordinator
    spawn_client("big", live.ws_url, MESH_FAKE_GPUS="2xA100-80GB", GPU_ENABLED="true")
    spawn_client("small", live.ws_url, MESH_FAKE_GPUS="1xRTX4090-24GB", GPU_ENABLED="true")
    await wait_until(lambda: all(n in live.mesh.nodes and live.mesh.nodes[n].online
                                 for n in ("big", "small")), 30, "both nodes online")
    trace = plain_trace(tmp_path, jobs=12)
    token = admin_token(live.settings)
    res = await asyncio.to_thread(run, str(trace), "--from-mesh", live.url, "--token", token)
    assert res.returncode == 0, res.stderr
    cluster = next(line for line in res.stdout.splitlines() if line.startswith("cluster: "))
    assert cluster.endswith(f"(3 GPUs) from {live.url}"), cluster
    assert "1x1:" in cluster and "1x2:" in cluster
    # Only 3- and 4-GPU jobs can be too wide for this mesh: the engine counts what it skips.
    doc = summaries((await asyncio.to_thread(
        run, str(trace), "--from-mesh", live.url, "--token", token, "--json")).stdout)[0]
    wide = sum(1 + (i * 7) % 4 > 2 for i in range(12))
    assert doc["total_gpus"] == 3 and doc["jobs"] + doc["skipped"] == 12
    assert doc["skipped"] <= wide
    refused = await asyncio.to_thread(run, str(trace), "--from-mesh", live.url, "--token", "nope")
    assert refused.returncode == 1 and "HTTP 401" in refused.stderr
