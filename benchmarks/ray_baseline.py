"""The Ray baseline, in its own process: `python -m benchmarks.ray_baseline`.

Ray local, as its users start it: `ray.init(num_cpus=2)` (no dashboard), a no-op
`@ray.remote` function, its native path `f.remote()` + `ray.get`. Nothing is durable. The
process reads one command per line on stdin and answers one JSON line on stdout, so the
benchmarks can measure Ray in blocks between their own (`RayBaseline` below):

    roundtrip N   N sequential `ray.get(noop.remote())`: {"samples_ns": [...]}
    throughput N  N `noop.remote()` then one `ray.get` of them all: {"tasks_per_s": x}
    pids          this process and every process Ray started: {"pids": [...]}

Ray is the `bench` extra: `pip install -e '.[bench]'`. Its own process keeps its threads
and its start-up (a few seconds) out of the benchmark's load generator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import psutil


def _serve() -> None:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)

    @ray.remote
    def noop(*_: Any) -> None:
        return None

    ray.get([noop.remote() for _ in range(200)])  # workers up and warm
    _say({"ready": True, "version": ray.__version__})
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "roundtrip":
            samples = []
            for _ in range(int(arg)):
                t0 = time.perf_counter_ns()
                ray.get(noop.remote())
                samples.append(time.perf_counter_ns() - t0)
            _say({"samples_ns": samples})
        elif cmd == "throughput":
            n = int(arg)
            t0 = time.perf_counter()
            ray.get([noop.remote() for _ in range(n)])
            _say({"tasks_per_s": n / (time.perf_counter() - t0)})
        elif cmd == "pids":
            me = psutil.Process()
            _say({"pids": [me.pid, *(p.pid for p in me.children(recursive=True))]})
        else:
            _say({"error": f"unknown command {cmd!r}"})
    ray.shutdown()


def _say(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


class RayBaseline:
    """The parent's handle on the Ray process; `with RayBaseline() as ray: ray.roundtrip(n)`."""

    def __init__(self) -> None:
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.ray_baseline"], env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        hello = self._read()
        if not hello.get("ready"):
            raise RuntimeError(f"Ray did not start: {hello}")
        self.version: str = hello["version"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the Ray process exited ({self.proc.poll()})")
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

    def __enter__(self) -> RayBaseline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()  # ray.shutdown() on EOF
        if self.proc.poll() is None:
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        try:  # anything of Ray's left in its session
            os.killpg(self.proc.pid, 9)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.stdout is not None:
            self.proc.stdout.close()


if __name__ == "__main__":
    _serve()
