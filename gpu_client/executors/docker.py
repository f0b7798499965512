"""The `docker` executor: a task's `image` run as a container, with exactly its GPUs.

Containers carry labels (`gpumesh.managed=1`, `gpumesh.task_id`, `gpumesh.attempt`,
`gpumesh.node`, plus `gpumesh.timeout_s` and `gpumesh.created_at`): the engine, not the client,
remembers what runs. After a client restart `adopt()` lists this node's containers and the
agent reports them in `register`; the coordinator answers keep (follow it to its end) or stop
(fenced: stop and remove it). A container stays after it exits, so its exit code and output
survive a client crash, and is removed by `release()` once the result is acked or fenced off.

`command` replaces the image's entrypoint (as Kubernetes' `command` does): the argv runs as
written whatever ENTRYPOINT the image has. `script` runs as `/bin/sh -c script`. With
neither, the image's own entrypoint and CMD run. Containers run with `init` (docker-init as
PID 1), so SIGTERM reaches the task and zombies are reaped.

Every Docker SDK call leaves the event loop. Short ones (create, start, stop, inspect, list,
remove, ping) go through `asyncio.to_thread`; the long ones (`wait` until the container ends,
the followed log stream, a pull) each get a daemon thread of their own: they would otherwise
hold the default pool's few workers for a task's whole life, and the loop's shutdown would
wait for containers to end. The create arguments come from `docker_spec.container_spec`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeGuard

import docker
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from requests.exceptions import RequestException

from gpu_client.detect import GpuSource
from gpu_client.executors.base import Adopted, OnOutput, OnStarted, RunOutcome, describe_exit
from gpu_client.executors.docker_io import DOCKER_ERRORS, LogPump, in_thread
from gpu_client.executors.docker_spec import (
    LABEL_ARTIFACTS,
    LABEL_ATTEMPT,
    LABEL_CREATED,
    LABEL_MANAGED,
    LABEL_NODE,
    LABEL_TASK,
    LABEL_TIMEOUT,
    container_spec,
)
from gpu_client.executors.workdir import Collected, collect_from_container, inputs_tar
from gpu_client.policy import VolumeRefused, resolve_volumes
from gpu_client.settings import ClientSettings
from shared.files import WORKSPACE
from shared.protocol import Assign

log = logging.getLogger(__name__)

API_TIMEOUT_S = 60.0  # short SDK calls; `stop` adds its grace to it
POOL_SIZE = 64  # each running container holds two connections (wait, logs)
PUMP_DRAIN_S = 5.0  # after exit, how long the log stream may take to deliver its end
LOG_TAIL_LINES = 10_000  # read for the result's output tail, then cut to bytes
DEFAULT_UNIX_SOCKET = "unix:///var/run/docker.sock"

Key = tuple[str, int]


@dataclass
class _Watch:
    """One attempt whose container this client follows; `cancel()` finds it here."""

    task_id: str
    attempt: int
    container_id: str
    created_at: float
    timeout_s: float | None
    cancelled: bool = False


class DockerExecutor:
    name = "docker"

    def __init__(
        self,
        node_name: str,
        source: GpuSource,
        *,
        output_tail_bytes: int = 16 * 1024,
        kill_grace_s: float = 5.0,
        pull_timeout_s: float = 600.0,
        environment: Mapping[str, str] | None = None,
        capabilities: Sequence[str] = (),
        stage_dir: Path | None = None,
        allowed_volumes: Sequence[str] = (),
    ) -> None:
        self._node = node_name
        self._volumes = tuple(allowed_volumes)  # MESH_ALLOWED_VOLUMES: none, no bind mount
        self._caps = tuple(capabilities)  # MESH_DOCKER_CAPS: all others are dropped
        self._source = source
        self._tail_bytes = output_tail_bytes
        self._grace = kill_grace_s
        self._pull_timeout = pull_timeout_s
        self._environment = None if environment is None else dict(environment)
        self._client: docker.DockerClient | None = None
        self._stream: docker.DockerClient | None = None  # no read timeout: wait, logs, pull
        self._available: bool | None = None
        self._watches: dict[Key, _Watch] = {}
        # Artifacts copied out of ended containers, until the result is acked (workdir.py)
        self._stage = stage_dir or Path(tempfile.gettempdir()) / "gpumesh-artifacts" / node_name

    # --- the Executor protocol ---------------------------------------------------------

    async def available(self) -> bool:
        """Does the engine answer a ping now? Re-probed by the agent: it may die or return."""
        try:
            await asyncio.to_thread(self._ping)
        except DOCKER_ERRORS as exc:
            if self._available is not False:
                log.warning("docker executor off: the engine does not answer: %s", exc)
            self._available = False
            return False
        if self._available is False:
            log.warning("docker executor back: the engine answers again")
        self._available = True
        return True

    async def run(self, assign: Assign, on_started: OnStarted, on_output: OnOutput) -> RunOutcome:
        if not assign.image:
            return RunOutcome(exit_code=None, error="a docker task needs an `image`")
        try:
            await asyncio.to_thread(self._connect)
        except DOCKER_ERRORS as exc:
            return RunOutcome(exit_code=None, error=self._unreachable(exc), infra=True)
        why = await self._ensure_image(assign.image)
        if why:
            return RunOutcome(exit_code=None, error=why, infra=_infra_text(why))
        gpus = await asyncio.to_thread(self._source.read)
        try:  # symlinks resolved on this host now, not the strings placement judged
            volumes = await asyncio.to_thread(resolve_volumes, assign.volumes, self._volumes)
        except VolumeRefused as exc:
            return RunOutcome(exit_code=None, error=f"node policy: {exc}")
        except OSError as exc:  # the node's own file system refused (permissions, disk)
            return RunOutcome(exit_code=None, infra=True,
                              error=f"could not prepare the volumes of {assign.image}: {exc}")
        created_at = time.time()
        spec = container_spec(assign, self._node, gpus, created_at=created_at, caps=self._caps,
                              volumes=volumes)
        try:
            files = inputs_tar(assign.files, WORKSPACE.lstrip("/")) if assign.files else b""
            cid = await asyncio.to_thread(self._create_and_start, spec, files)
        except DOCKER_ERRORS + (ValueError,) as exc:
            return RunOutcome(
                exit_code=None, error=f"could not start a container of {assign.image}: "
                f"{_explain(exc)}", duration_s=round(time.time() - created_at, 3),
                infra=node_fault(exc),
            )
        watch = _Watch(assign.task_id, assign.attempt, cid, created_at, assign.timeout_s)
        self._watches[(watch.task_id, watch.attempt)] = watch  # cancel() reaches it from now on
        log.info("task %s.%d started as container %s", watch.task_id, watch.attempt, cid[:12],
                 extra={"task": watch.task_id, "attempt": watch.attempt, "node": self._node})
        on_started()
        return await self._follow(watch, on_output, tail="all")

    async def cancel(self, task_id: str, attempt: int, grace_s: float | None = None) -> None:
        watch = self._watches.get((task_id, attempt))
        if watch is not None:
            watch.cancelled = True
            ids = [watch.container_id]
        elif self._client is None:
            return  # never connected: nothing of ours can run
        else:
            try:
                ids = [c.id for c in await asyncio.to_thread(self._list, task_id, attempt)]
            except DOCKER_ERRORS as exc:
                log.warning("cannot find the container of %s.%d to stop: %s", task_id, attempt,
                            exc, extra={"task": task_id, "attempt": attempt})
                return
        for cid in ids:
            await self._stop(cid, grace_s)

    async def adopt(self) -> list[Adopted]:
        if not await self.available():
            return []
        try:
            found = await asyncio.to_thread(self._list)
        except DOCKER_ERRORS as exc:
            log.warning("cannot list this node's containers to adopt them: %s", exc)
            return []
        adopted = []
        for container in found:
            entry = await self._adopt_one(container)
            if entry is not None:
                adopted.append(entry)
        return adopted

    async def release(self, task_id: str, attempt: int) -> None:
        self._watches.pop((task_id, attempt), None)
        await asyncio.to_thread(shutil.rmtree, self._stage / f"{task_id}.{attempt}", True)
        try:
            await asyncio.to_thread(self._remove_all, task_id, attempt)
        except DOCKER_ERRORS as exc:
            log.warning("could not remove the container of %s.%d: %s", task_id, attempt, exc,
                        extra={"task": task_id, "attempt": attempt})

    def close(self) -> None:
        """Blocking. Close the SDK's connections (tests; a client process just exits)."""
        for client in (self._client, self._stream):
            if client is not None:
                client.close()
        self._client = self._stream = None

    # --- following a container to its end ---------------------------------------------

    async def _follow(self, watch: _Watch, on_output: OnOutput, *, tail: str | int) -> RunOutcome:
        """Stream its output, enforce its timeout, wait for its exit; then read its outcome."""
        key = (watch.task_id, watch.attempt)
        stream = self._stream
        assert stream is not None
        pump = LogPump(asyncio.get_running_loop(), on_output)
        pump.start(stream, watch.container_id, tail)
        waiter = in_thread(stream.api.wait, watch.container_id, timeout=None)
        error = ""
        try:
            left = None
            if watch.timeout_s is not None:
                left = max(0.0, watch.timeout_s - (time.time() - watch.created_at))
            done, _ = await asyncio.wait({waiter}, timeout=left)
            if not done:
                error = f"timed out after {watch.timeout_s:g}s"
                log.info("task %s.%d %s: stopping its container", *key, error,
                         extra={"task": watch.task_id, "attempt": watch.attempt})
                await self._stop(watch.container_id)
            try:
                await waiter
            except DOCKER_ERRORS as exc:
                return RunOutcome(
                    exit_code=None, error=self._unreachable(exc, "while the task ran"),
                    output=pump.text_tail(self._tail_bytes), duration_s=_since(watch.created_at),
                    infra=True,
                )
        except asyncio.CancelledError:
            pump.detach()  # the client is stopping: the container runs on, to be re-adopted
            raise
        finally:
            if self._watches.get(key) is watch:
                del self._watches[key]
        await asyncio.to_thread(pump.join, PUMP_DRAIN_S)
        if watch.cancelled:
            error = "cancelled"
        return await asyncio.to_thread(self._outcome, watch.container_id, watch.created_at, error)

    async def _adopt_one(self, container: Any) -> Adopted | None:
        labels = container.attrs.get("Labels") or {}
        try:
            task_id, attempt = labels[LABEL_TASK], int(labels[LABEL_ATTEMPT])
            created_at = float(labels.get(LABEL_CREATED, time.time()))
            timeout_s = float(labels[LABEL_TIMEOUT]) if LABEL_TIMEOUT in labels else None
        except (KeyError, ValueError) as exc:
            log.warning("ignoring container %s with unreadable labels: %r", container.id[:12], exc)
            return None
        extra = {"task": task_id, "attempt": attempt, "node": self._node}
        if container.status == "created":  # the client died between create and start
            log.info("removing container %s of %s.%d: never started", container.id[:12],
                     task_id, attempt, extra=extra)
            await self.release(task_id, attempt)
            return None
        running = container.status in ("running", "restarting", "paused")
        watch = _Watch(task_id, attempt, container.id, created_at, timeout_s)
        if running:
            self._watches[(task_id, attempt)] = watch
        log.info("adopted task %s.%d in container %s (%s)", task_id, attempt,
                 container.id[:12], container.status, extra=extra)

        async def follow(on_output: OnOutput) -> RunOutcome:
            if running:
                return await self._follow(watch, on_output, tail=0)
            return await asyncio.to_thread(self._outcome, container.id, created_at, "")

        return Adopted(task_id=task_id, attempt=attempt, running=running, follow=follow)

    async def _ensure_image(self, image: str) -> str:
        """"" when the engine has `image` (pulling it once if not); else why it cannot run."""
        client = self._client
        assert client is not None
        try:
            await asyncio.to_thread(client.images.get, image)
            return ""
        except ImageNotFound:
            pass
        except APIError as exc:
            if exc.is_client_error():  # the engine answered: the reference itself is refused
                return f"image {image} refused by the engine on node {self._node}: {_explain(exc)}"
            return self._unreachable(exc)
        except DOCKER_ERRORS as exc:
            return self._unreachable(exc)
        missing = f"image {image} not found on node {self._node}"
        log.info("%s: pulling it (at most %gs)", missing, self._pull_timeout)
        pull = in_thread(self._pull, image)
        done, _ = await asyncio.wait({pull}, timeout=self._pull_timeout)
        if not done:
            return f"{missing}; pulling it took longer than {self._pull_timeout:g}s"
        failed = pull.exception()
        if _engine_gone(failed):
            return self._unreachable(failed, "while pulling")
        if failed is not None:
            return f"{missing}; pulling it failed: {_explain(failed)}"
        return ""

    async def _stop(self, cid: str, grace_s: float | None = None) -> None:
        """SIGTERM the container, SIGKILL after the grace (the engine does both; docker-py
        adds it to the HTTP timeout)."""
        client = self._client
        if client is None:
            return
        grace = self._grace if grace_s is None else grace_s
        try:
            await asyncio.to_thread(client.api.stop, cid, timeout=max(1, round(grace)))
        except NotFound:
            pass
        except DOCKER_ERRORS as exc:
            log.warning("could not stop container %s: %s", cid[:12], exc)

    def _unreachable(self, exc: BaseException, when: str = "") -> str:
        where = f" {when}" if when else ""
        return f"docker engine on node {self._node} unreachable{where}: {_explain(exc)}"

    # --- blocking helpers: called through asyncio.to_thread or _in_thread -----------------

    def _connect(self) -> docker.DockerClient:
        if self._client is None:
            env = self._environment
            _probe_socket(os.environ if env is None else env)
            client = docker.from_env(environment=env, timeout=API_TIMEOUT_S,
                                     max_pool_size=POOL_SIZE)
            try:
                client.ping()
                self._stream = docker.from_env(environment=env, timeout=None,
                                               version=client.api.api_version,
                                               max_pool_size=POOL_SIZE)
            except DOCKER_ERRORS:
                client.close()
                raise
            self._client = client
        return self._client

    def _ping(self) -> None:
        client = self._connect()
        client.ping()

    def _create_and_start(self, spec: dict[str, Any], files: bytes = b"") -> str:
        assert self._client is not None
        container = self._client.containers.create(**spec)
        try:
            if files:  # the task's files, into its working dir before it starts
                container.put_archive("/", files)
            container.start()
        except DOCKER_ERRORS:
            container.remove(force=True)
            raise
        return str(container.id)

    def _pull(self, image: str) -> None:
        assert self._stream is not None
        for event in self._stream.api.pull(image, stream=True, decode=True):
            if isinstance(event, dict) and event.get("error"):
                raise DockerException(str(event["error"]))
        self._stream.images.get(image)  # raises ImageNotFound if the pull did not take

    def _list(self, task_id: str | None = None, attempt: int | None = None) -> list[Any]:
        assert self._client is not None
        labels = [f"{LABEL_MANAGED}=1", f"{LABEL_NODE}={self._node}"]
        if task_id is not None:
            labels += [f"{LABEL_TASK}={task_id}", f"{LABEL_ATTEMPT}={attempt}"]
        # sparse: the list endpoint alone, so a container removed meanwhile cannot fail it
        found: list[Any] = self._client.containers.list(
            all=True, filters={"label": labels}, sparse=True
        )
        return found

    def _remove_all(self, task_id: str, attempt: int) -> None:
        if self._client is None:
            return
        for container in self._list(task_id, attempt):
            try:
                container.remove(force=True, v=True)
            except NotFound:
                continue
            log.info("removed container %s of %s.%d", container.id[:12], task_id, attempt,
                     extra={"task": task_id, "attempt": attempt, "node": self._node})

    def _outcome(self, cid: str, created_at: float, error: str) -> RunOutcome:
        """The exit code, output tail and duration of an ended container."""
        assert self._client is not None
        try:
            attrs = self._client.api.inspect_container(cid)
            raw = self._client.api.logs(cid, stdout=True, stderr=True, tail=LOG_TAIL_LINES)
        except NotFound:
            return RunOutcome(exit_code=None, error=error or f"container {cid[:12]} vanished")
        except DOCKER_ERRORS as exc:
            return RunOutcome(exit_code=None, error=error or self._unreachable(exc),
                              infra=not error)
        state = attrs.get("State", {})
        exit_code = state.get("ExitCode")
        finished = _docker_time(state.get("FinishedAt", "")) or time.time()
        if not error:
            if state.get("OOMKilled"):
                limit = attrs.get("HostConfig", {}).get("Memory") or 0
                error = f"out of memory: killed at its {limit // (1 << 20)} MiB limit"
            elif exit_code is None:
                error = "container ended without an exit code"
            elif exit_code != 0:
                error = describe_exit(int(exit_code))
        return RunOutcome(
            exit_code=exit_code, output=_tail_text(raw, self._tail_bytes), error=error,
            duration_s=round(max(0.0, finished - created_at), 3),
            artifacts=self._artifacts(cid, attrs, error),
        )

    def _artifacts(self, cid: str, attrs: dict[str, Any], error: str) -> Collected | None:
        """Blocking: the declared artifacts of an ended container, copied to this host."""
        labels = attrs.get("Config", {}).get("Labels") or {}
        if error == "cancelled" or LABEL_ARTIFACTS not in labels:
            return None
        patterns = [str(p) for p in json.loads(labels[LABEL_ARTIFACTS])]
        dest = self._stage / f"{labels.get(LABEL_TASK, cid)}.{labels.get(LABEL_ATTEMPT, 0)}"
        assert self._client is not None
        return collect_from_container(self._client.api, cid, patterns, dest)


def _probe_socket(env: Mapping[str, str]) -> None:
    """Fail fast, and without the socket docker-py leaks then, when a unix socket is dead."""
    host = env.get("DOCKER_HOST") or DEFAULT_UNIX_SOCKET
    if not host.startswith("unix://"):
        return
    path = host[len("unix://"):]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        try:
            sock.connect(path)
        except OSError as exc:
            raise DockerException(f"cannot connect to {path}: {exc.strerror or exc}") from exc


def node_fault(exc: BaseException) -> bool:
    """Is a Docker error the node's (engine gone, disk full), not the task's (bad image, spec)?"""
    if _engine_gone(exc):
        return True  # connection refused, reset, timed out: the engine is gone
    return _infra_text(_explain(exc))


def _engine_gone(exc: BaseException | None) -> TypeGuard[BaseException]:
    """No answer from the engine. An APIError is an HTTPError, so a RequestException too,
    but it is the engine answering (no such image, registry unreachable, bad spec)."""
    return isinstance(exc, RequestException) and not isinstance(exc, APIError)


def _infra_text(why: str) -> bool:
    # The engine itself gone (our `_unreachable` wording) or its disk full is the node's
    # fault. A pull that fails (no such image, registry down or unreachable) is the task's:
    # one misspelt image must not quarantine every node it is tried on.
    low = why.lower()
    return "no space left on device" in low or low.startswith("docker engine on node")


def _explain(exc: BaseException) -> str:
    if isinstance(exc, APIError) and exc.explanation:
        return str(exc.explanation)
    return str(exc) or type(exc).__name__


def _tail_text(raw: bytes, limit: int) -> str:
    if limit <= 0:
        return ""
    data = raw[-limit:]
    if len(raw) > limit:
        data = data.lstrip(bytes(range(0x80, 0xC0)))  # no half character in front
    return data.decode("utf-8", errors="replace")


def _docker_time(text: str) -> float | None:
    """Docker's RFC 3339 times carry nanoseconds; Python reads at most microseconds."""
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", text or "")
    if m is None or text.startswith("0001-"):
        return None
    frac = (m.group(2) or ".0")[:7]
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    return datetime.fromisoformat(m.group(1) + frac + zone).timestamp()


def _since(t: float) -> float:
    return round(max(0.0, time.time() - t), 3)


def create(settings: ClientSettings, source: GpuSource) -> DockerExecutor:
    return DockerExecutor(settings.node_name, source, output_tail_bytes=settings.output_tail_bytes,
                          capabilities=settings.docker_caps,
                          stage_dir=settings.work_dir / ".docker-artifacts",
                          allowed_volumes=settings.allowed_volumes)
