"""How this node isolates process tasks, stated at start, in `register` and in `gpumesh detect`.

- `user+cgroup`: the client is root and gives each attempt a uid of its own (MESH_TASK_UIDS)
  and a cgroup of its own (cgroup v2 writable: gpu_client/executors/tree.py). The cgroup is
  root's: the task cannot write its `cgroup.procs` nor any other, so it cannot leave it, and
  `cgroup.kill` ends all of it.
- `user`: a uid per attempt, no cgroup (MESH_CGROUP=off, cgroup v1 only, a read-only
  /sys/fs/cgroup): processes are found by process group, session and an env marker, so a
  task that double-forks with `env -i setsid` outlives it.
- `none`: tasks run as the client's user (a client that is not root: a laptop, a non-root
  container) or as MESH_RUN_AS's one user shared by all: they can read each other's files,
  and a non-root client's own secrets.

A node at `none` runs process tasks of its owner's tenant only (MESH_OWNER_TENANT, default
`default`: the tenant of work submitted with auth off or by an admin), stated as
`NodePolicy.owner_tenant` so placement never sends it another tenant's, unless its owner opts
in with MESH_ISOLATION=none.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from gpu_client.executors.tree import cgroup_root
from gpu_client.settings import ClientSettings

log = logging.getLogger(__name__)

LEVELS = ("user+cgroup", "user", "none")


def client_is_root() -> bool:
    """Whether the client may give tasks users and cgroups of their own (effective uid 0)."""
    return os.geteuid() == 0


def level(settings: ClientSettings, cgroups: bool) -> str:
    """`user+cgroup`, `user` or `none` for a client with these settings; `cgroups`: whether
    per-task cgroups can be made here (`probe_cgroups`)."""
    if not client_is_root() or settings.run_as:
        return "none"
    return "user+cgroup" if cgroups else "user"


def probe_cgroups(settings: ClientSettings) -> bool:
    """Blocking: whether per-task cgroups can be made (MESH_CGROUP, a writable cgroup v2)."""
    return cgroup_root(settings.cgroup) is not None


def owner_tenant(settings: ClientSettings, isolation: str) -> str:
    """The tenant a node at `isolation` restricts process tasks to ("" = none)."""
    if isolation != "none" or settings.isolation == "none" or "process" not in settings.executors:
        return ""
    return settings.owner_tenant


def describe(settings: ClientSettings) -> tuple[str, str]:
    """Blocking: this node's level and what it means for process tasks, in one line."""
    found = level(settings, probe_cgroups(settings))
    if found == "user+cgroup":
        return found, "each process task runs as a user and in a cgroup of its own"
    if found == "user":
        return found, (f"no per-task cgroups here (MESH_CGROUP={settings.cgroup}, or no "
                       "writable cgroup v2): a process task's detached processes (setsid, "
                       "env -i) can outlive it")
    why = (f"MESH_RUN_AS={settings.run_as}: every process task shares that user"
           if settings.run_as else "the client is not root: process tasks run as its user")
    if "process" not in settings.executors:
        return found, f"{why} (the process executor is not offered)"
    if settings.isolation == "none":
        return found, f"{why}; MESH_ISOLATION=none: every tenant's process tasks run anyway"
    return found, (f"{why}: process tasks of tenant {settings.owner_tenant!r} "
                   "(MESH_OWNER_TENANT) only; MESH_ISOLATION=none runs every tenant's")


def describe_env(env: Mapping[str, str]) -> tuple[str, str]:
    """Blocking: `describe` for a client started with `env` (`gpumesh detect`); ("unknown",
    why) where those settings would stop the client."""
    try:
        settings = ClientSettings.from_env(env)
    except ValueError as exc:  # ConfigError
        return "unknown", str(exc)
    return describe(settings)


def detect(settings: ClientSettings) -> str:
    """Blocking: this node's level, logged once at start with what it means."""
    found, why = describe(settings)
    if found == "user+cgroup":
        log.info("isolation %s: %s", found, why)
    else:
        log.warning("isolation %s: %s", found, why)
    return found
