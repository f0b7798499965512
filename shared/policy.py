"""Node policy: what a node agrees to run. One pure check used by both sides.

The coordinator's placement filters nodes with `refusal` (so it never sends a task a node
would refuse, and a queued task's reason names the policy); the client runs the same check
on every `assign` before it starts anything (defence in depth).
"""

from __future__ import annotations

import fnmatch
import functools
import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from shared.protocol import NodePolicy

# Environment names no task may set: they make the dynamic loader or an interpreter run code
# the task did not name (preloaded libraries, startup files, module search paths).
HOOK_ENV: tuple[str, ...] = (
    "LD_*", "DYLD_*", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME", "PYTHONINSPECT",
    "PYTHONUSERBASE", "PYTHONEXECUTABLE", "BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "PS4",
    "PROMPT_COMMAND", "IFS", "PERL5OPT", "PERL5LIB", "PERLLIB", "PERL5DB", "NODE_OPTIONS",
    "NODE_PATH", "RUBYOPT", "RUBYLIB", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS",
    "GCONV_PATH", "LOCPATH", "NLSPATH", "HOSTALIASES", "RESOLV_HOST_CONF", "MALLOC_*",
    "GLIBC_TUNABLES", "BASH_FUNC_*", "GIT_*", "LUA_INIT*", "LUA_PATH*", "LUA_CPATH*",
    "PHPRC", "PHP_INI_SCAN_DIR", "TCLLIBPATH", "OPENSSL_CONF", "OPENSSL_ENGINES",
)

# Environment names that steer the container runtime or a GPU stack's choice of devices: only
# the node's GPU assignment sets them (NVIDIA_VISIBLE_DEVICES=all in a task's env would hand
# it every GPU through the NVIDIA container runtime; CUDA_DEVICE_ORDER renumbers the indices
# the assignment names).
GPU_ENV: tuple[str, ...] = (
    "NVIDIA_*", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "CUDA_MPS_*",
    "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL", "AMD_VISIBLE_DEVICES",
    "ZE_AFFINITY_MASK", "ZE_ENABLE_PCI_ID_DEVICE_ORDER", "ONEAPI_DEVICE_SELECTOR",
    "SYCL_DEVICE_FILTER",
)


@dataclass(frozen=True, slots=True)
class PolicyAsk:
    """What a task asks of a node that its policy judges."""

    executor: str
    image: str = ""
    volumes: tuple[str, ...] = ()
    env_names: tuple[str, ...] = ()
    tenant: str = ""  # "" = DEFAULT_TENANT; judged by a node's `owner_tenant` (not in `trivial`)

    @property
    def trivial(self) -> bool:
        return not (self.image or self.volumes or self.env_names)


DEFAULT_TENANT = "default"  # the tenant of work submitted without one (auth off, an admin)


def owner_refusal(policy: NodePolicy, ask: PolicyAsk) -> str:
    """A node that cannot isolate process tasks (isolation `none`, no MESH_ISOLATION=none
    opt-in) runs only its owner's: another tenant's process task is refused."""
    owner = policy.owner_tenant
    if not owner or ask.executor != "process" or (ask.tenant or DEFAULT_TENANT) == owner:
        return ""
    return (f"isolation none: this node runs process tasks of its owner's tenant {owner!r} "
            "only (it cannot give a task a user and cgroup of its own; its owner opts in "
            "to others with MESH_ISOLATION=none)")


def volume_source(spec: str) -> str:
    """The host side of a Docker volume spec `src:dst[:mode]` (a path or a volume name)."""
    return spec.split(":", 1)[0] if ":" in spec else spec


def volume_parts(spec: str) -> tuple[str, str, str]:
    """`src:dst[:mode]` as (src, dst, mode); mode "" when the task states none."""
    src, _, rest = spec.partition(":")
    dst, _, mode = rest.partition(":")
    return src, dst, mode


def allowed_entry(entry: str) -> tuple[str, bool]:
    """One MESH_ALLOWED_VOLUMES entry `prefix[:ro|:rw]` as (prefix, writable); ro by default."""
    prefix, _, mode = entry.rpartition(":") if entry.endswith((":rw", ":ro")) else (entry, "", "")
    return prefix, mode == "rw"


def under(path: str, prefix: str) -> bool:
    """Whether normalised absolute `path` is `prefix` or below it, on a component boundary
    (`/data` holds `/data/x`, never `/database`)."""
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def under_prefix(path: str, prefixes: Iterable[str]) -> bool:
    """Whether absolute `path` (normalised: no `..` escapes) lies under one of `prefixes`."""
    norm = posixpath.normpath(path)
    return any(under(norm, posixpath.normpath(allowed_entry(p)[0])) for p in prefixes)


def writable_under(path: str, allowed: Iterable[str]) -> bool:
    """Whether the policy lets a mount of `path` (a normalised path, or a volume name) be
    read-write: the deepest allowed entry holding it says `:rw`."""
    best, writable = -1, False
    for entry in allowed:
        prefix, rw = allowed_entry(entry)
        if path.startswith("/") and prefix.startswith("/"):
            prefix = posixpath.normpath(prefix)
            if under(path, prefix) and len(prefix) > best:
                best, writable = len(prefix), rw
        elif path == prefix:
            return rw
    return writable


def volume_refusal(spec: str, allowed: Sequence[str]) -> str:
    src, _, mode = volume_parts(spec)
    if mode not in ("", "ro", "rw"):
        return f"bind mount {spec!r}: the mode must be `ro` or `rw`"
    names = [allowed_entry(a)[0] for a in allowed]
    if not src.startswith("/"):
        if src in names:
            if mode == "rw" and not writable_under(src, allowed):
                return f"volume {src!r} is read-only on this node (MESH_ALLOWED_VOLUMES `:rw`)"
            return ""
        if src.startswith((".", "~")) or "/" in src:
            return f"bind mount {spec!r}: the host path must be absolute"
        return f"named volume {src!r} is not in the node's allowed volumes"
    if not allowed:
        return f"bind mount {spec!r} refused: this node allows no host paths (MESH_ALLOWED_VOLUMES)"
    if not under_prefix(src, (a for a in names if a.startswith("/"))):
        return f"bind mount {spec!r} is outside the node's allowed paths {list(allowed)}"
    if mode == "rw" and not writable_under(posixpath.normpath(src), allowed):
        return (f"bind mount {spec!r} asks to write, but the node allows that path read-only "
                f"{list(allowed)} (an entry `prefix:rw` allows writes)")
    return ""


def _is_registry(component: str, more: bool) -> bool:
    """Docker's rule: a first component followed by more is a registry host when it holds a
    `.` or a `:` or is `localhost`."""
    return more and ("." in component or ":" in component or component == "localhost")


@functools.lru_cache(maxsize=256)
def _component(pattern: str) -> re.Pattern[str]:
    """One path component's glob: `*` any run and `?` one character, never `/`."""
    parts = (("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c)) for c in pattern)
    return re.compile("".join(parts))


def image_matches(image: str, pattern: str) -> bool:
    """Whether `image` matches one MESH_ALLOWED_IMAGES glob. `*` alone admits every image;
    otherwise `*`/`?` match within one `/`-separated component (so `lab/*` never admits
    `lab/a/b`), and a registry host is named literally, never matched by a glob: `myimg*`
    does not admit `myimg.evil.example/x`, nor `registry.local/*` `registry.local.evil/x`."""
    if pattern == "*":
        return True
    comps, pats = image.split("/"), pattern.split("/")
    if len(comps) != len(pats) or any(c in ("", ".", "..") for c in comps):
        return False
    for i, (comp, pat) in enumerate(zip(comps, pats, strict=True)):
        if i == 0 and (_is_registry(comp, len(comps) > 1) or _is_registry(pat, len(pats) > 1)):
            if comp != pat:
                return False
        elif not _component(pat).fullmatch(comp):
            return False
    return True


@functools.lru_cache(maxsize=256)
def _any_of(patterns: tuple[str, ...]) -> re.Pattern[str]:
    """One regex for a list of globs: a name is checked once, not once per pattern."""
    return re.compile("|".join(fnmatch.translate(p) for p in patterns) or r"(?!)")


def env_refusal(names: Iterable[str], forbidden: Sequence[str]) -> str:
    matcher = _any_of(tuple(forbidden))
    bad = sorted(n for n in names if matcher.match(n))
    gpu = _any_of(GPU_ENV)
    steer = [n for n in bad if gpu.match(n)]
    if steer:
        return (f"env {', '.join(steer)} may not be set: the node sets them from the task's "
                "GPU assignment")
    if bad:
        return f"env {', '.join(bad)} may not be set (loader or interpreter hooks)"
    return ""


def refusal(policy: NodePolicy | None, ask: PolicyAsk) -> str:
    """Why a node with `policy` refuses `ask`; "" when it accepts. None: no stated policy."""
    if policy is None:
        return ""
    if policy.executors and ask.executor not in policy.executors:
        return f"executor {ask.executor} not offered"
    if why := owner_refusal(policy, ask):
        return why
    if ask.trivial:
        return ""
    images = policy.allowed_images
    if ask.executor == "docker" and ask.image and not any(
        image_matches(ask.image, pat) for pat in images
    ):
        return f"image {ask.image!r} does not match the allowed images {policy.allowed_images}"
    for spec in ask.volumes:
        why = volume_refusal(spec, policy.allowed_volumes)
        if why:
            return why
    return env_refusal(ask.env_names, policy.forbidden_env)
