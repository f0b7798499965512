"""What this node agrees to run, stated in `register` and checked again on every `assign`.

The coordinator's placement already respects the policy; the client checks each assignment
once more before it starts anything (an older coordinator, or one that is wrong, cannot make
it run what its operator did not allow). The checks themselves live in `shared.policy`.
"""

from __future__ import annotations

import errno
import os
import posixpath
from collections.abc import Iterable, Sequence

from gpu_client.settings import ClientSettings
from shared.policy import (
    GPU_ENV,
    HOOK_ENV,
    PolicyAsk,
    allowed_entry,
    refusal,
    under,
    volume_parts,
    volume_refusal,
    writable_under,
)
from shared.protocol import Assign, NodePolicy


def node_policy(
    settings: ClientSettings, executors: Iterable[str], owner_tenant: str = ""
) -> NodePolicy:
    """The policy sent in `register`: the executors offered and the operator's allow lists.
    The hook list and the GPU steering variables (set only from the node's GPU assignment)
    are always forbidden; MESH_FORBIDDEN_ENV adds to them. `owner_tenant`: a node that cannot
    isolate process tasks runs only this tenant's (gpu_client/isolation.py)."""
    return NodePolicy(
        owner_tenant=owner_tenant,
        executors=list(executors),
        allowed_images=list(settings.allowed_images),
        allowed_volumes=list(settings.allowed_volumes),
        forbidden_env=list(dict.fromkeys((*HOOK_ENV, *GPU_ENV, *settings.forbidden_env))),
        capabilities=list(settings.docker_caps),
    )


def ask_of(assign: Assign) -> PolicyAsk:
    return PolicyAsk(
        executor=assign.executor, image=assign.image or "", volumes=tuple(assign.volumes),
        env_names=tuple(assign.env), tenant=assign.tenant,
    )


def assign_refusal(policy: NodePolicy, assign: Assign) -> str:
    """Why this node refuses `assign` ("" when it may run), worded for the task's error."""
    why = refusal(policy, ask_of(assign))
    return f"node policy: {why}" if why else ""


class VolumeRefused(Exception):
    """A task's volume that resolves outside what the node allows: the task's failure."""


def resolve_volumes(volumes: Sequence[str], allowed: Sequence[str]) -> list[str]:
    """Blocking (file system): each `src:dst[:mode]` as the engine must get it, `src` with
    every symlink resolved on this host and checked against the allowed prefixes (themselves
    resolved), on a component boundary, and an explicit mode: `ro` unless the entry that
    holds the resolved path says `:rw` and the task did not ask for `ro`. Named volumes pass
    by name. Called right before the container is created: a link a task planted under an
    allowed prefix since placement is caught here. Raises VolumeRefused with the reason.

    A missing source is created (as the engine would), one component at a time below its
    deepest existing directory, never through a link. What remains: a task holding a
    writable mount of the same tree could swap a directory for a link between this check
    and the engine's mount (docs/security.md)."""
    out = []
    for spec in volumes:
        why = volume_refusal(spec, allowed)
        if why:
            raise VolumeRefused(why)
        src, dst, mode = volume_parts(spec)
        if not src.startswith("/"):
            rw = mode != "ro" and writable_under(src, allowed)
            out.append(f"{src}:{dst}:{'rw' if rw else 'ro'}")
            continue
        if posixpath.normpath(src) != (src.rstrip("/") or "/") or "//" in src:
            raise VolumeRefused(f"bind mount {spec!r}: the host path must be normalised "
                                "(no `.`, `..` or `//`)")
        roots = [(os.path.realpath(p), rw) for p, rw in map(allowed_entry, allowed)
                 if p.startswith("/")]
        real = _resolve(src, spec, roots)
        held = [(root, rw) for root, rw in roots if under(real, root)]
        if not held:
            raise VolumeRefused(
                f"bind mount {spec!r} resolves to {real} on this node, outside the allowed "
                f"paths {list(allowed)} (a symlink leads out)")
        rw = mode != "ro" and max(held, key=lambda h: len(h[0]))[1]
        out.append(f"{real}:{dst}:{'rw' if rw else 'ro'}")
    return out


def _resolve(src: str, spec: str, roots: Sequence[tuple[str, bool]]) -> str:
    try:
        return os.path.realpath(src, strict=True)
    except FileNotFoundError:
        pass
    except OSError as exc:  # a link loop, a file in the way
        raise VolumeRefused(f"bind mount {spec!r}: {exc.strerror or exc}") from exc
    base, missing = src.rstrip("/"), list[str]()
    while True:
        base, name = posixpath.split(base)
        missing.insert(0, name)
        try:
            real = os.path.realpath(base or "/", strict=True)
            break
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise VolumeRefused(f"bind mount {spec!r}: {exc.strerror or exc}") from exc
    target = posixpath.join(real, *missing)
    if not any(under(target, root) for root, _ in roots):
        raise VolumeRefused(
            f"bind mount {spec!r} resolves to {target} on this node, outside the allowed "
            "paths (a symlink leads out)")
    fd = os.open(real, os.O_PATH | os.O_DIRECTORY)
    try:
        for name in missing:  # mkdir never follows a link in its last component
            try:
                os.mkdir(name, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            nfd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise VolumeRefused(f"bind mount {spec!r}: a link or file is in the way") from exc
        raise
    finally:
        os.close(fd)
    try:
        return os.path.realpath(src, strict=True)
    except OSError as exc:
        raise VolumeRefused(f"bind mount {spec!r}: {exc.strerror or exc}") from exc
