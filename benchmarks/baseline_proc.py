"""A baseline system in a process of its own, driven over stdin/stdout, one JSON line each.

Ray (benchmarks/ray_baseline.py) and Dask (benchmarks/dask_baseline.py) run this way, so
their threads never share the load generator's interpreter: a Dask client and scheduler in
the benchmark's own process took the GIL from its HTTP load generator and cut gpumesh's
measured throughput by a third (docs/benchmarks.md, issue 16). The child answers
`{"ready": true, "version": ...}` once warm, then one line per command:

    roundtrip N   N sequential tasks, each waited for: {"samples_ns": [...]}
    throughput N  N tasks, then wait for all: {"tasks_per_s": x}
    pids          the child and every process it started: {"pids": [...]}
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil


def serve(version: str, roundtrip: Callable[[], Any], throughput: Callable[[int], None]) -> None:
    """The child's side: answer commands on stdin until it closes. `roundtrip()` runs one
    task and waits for it; `throughput(n)` runs n tasks and waits for them all."""
    say({"ready": True, "version": version})
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "roundtrip":
            samples = []
            for _ in range(int(arg)):
                t0 = time.perf_counter_ns()
                roundtrip()
                samples.append(time.perf_counter_ns() - t0)
            say({"samples_ns": samples})
        elif cmd == "throughput":
            n = int(arg)
            t0 = time.perf_counter()
            throughput(n)
            say({"tasks_per_s": n / (time.perf_counter() - t0)})
        elif cmd == "pids":
            me = psutil.Process()
            say({"pids": [me.pid, *(p.pid for p in me.children(recursive=True))]})
        else:
            say({"error": f"unknown command {cmd!r}"})


def say(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


class BaselineProcess:
    """The parent's handle: `with RayBaseline() as ray: ray.roundtrip(n)`."""

    MODULE = ""
    ENV: dict[str, str] = {}

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.ENV)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.MODULE], env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        hello = self._read()
        if not hello.get("ready"):
            raise RuntimeError(f"{self.MODULE} did not start: {hello}")
        self.version: str = hello["version"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.MODULE} process exited ({self.proc.poll()})")
        doc: dict[str, Any] = json.loads(line)
        return doc

    def _ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def roundtrip(self, n: int) -> list[int]:
        return list(self._ask(f"roundtrip {n}")["samples_ns"])

    def throughput(self, n: int) -> float:
        return float(self._ask(f"throughput {n}")["tasks_per_s"])

    def pids(self) -> list[int]:
        return list(self._ask("pids")["pids"])

    def __enter__(self) -> BaselineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()  # the child shuts its system down on EOF
        if self.proc.poll() is None:
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        try:  # anything the child started and left in its session
            os.killpg(self.proc.pid, 9)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.stdout is not None:
            self.proc.stdout.close()
