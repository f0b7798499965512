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
from fnmatch import fnmatchcase

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


@dataclass(frozen=True, slots=True)
class PolicyAsk:
    """What a task asks of a node that its policy judges."""

    executor: str
    image: str = ""
    volumes: tuple[str, ...] = ()
    env_names: tuple[str, ...] = ()

    @property
    def trivial(self) -> bool:
        return not (self.image or self.volumes or self.env_names)


def volume_source(spec: str) -> str:
    """The host side of a Docker volume spec `src:dst[:mode]` (a path or a volume name)."""
    return spec.split(":", 1)[0] if ":" in spec else spec


def under_prefix(path: str, prefixes: Iterable[str]) -> bool:
    """Whether absolute `path` (normalised: no `..` escapes) lies under one of `prefixes`."""
    norm = posixpath.normpath(path)
    for prefix in prefixes:
        p = posixpath.normpath(prefix)
        if norm == p or norm.startswith(p.rstrip("/") + "/"):
            return True
    return False


def volume_refusal(spec: str, allowed: Sequence[str]) -> str:
    src = volume_source(spec)
    if not src.startswith("/"):
        if src in allowed:
            return ""
        if src.startswith((".", "~")) or "/" in src:
            return f"bind mount {spec!r}: the host path must be absolute"
        return f"named volume {src!r} is not in the node's allowed volumes"
    if not allowed:
        return f"bind mount {spec!r} refused: this node allows no host paths (MESH_ALLOWED_VOLUMES)"
    if not under_prefix(src, (a for a in allowed if a.startswith("/"))):
        return f"bind mount {spec!r} is outside the node's allowed paths {list(allowed)}"
    return ""


@functools.lru_cache(maxsize=256)
def _any_of(patterns: tuple[str, ...]) -> re.Pattern[str]:
    """One regex for a list of globs: a name is checked once, not once per pattern."""
    return re.compile("|".join(fnmatch.translate(p) for p in patterns) or r"(?!)")


def env_refusal(names: Iterable[str], forbidden: Sequence[str]) -> str:
    matcher = _any_of(tuple(forbidden))
    bad = sorted(n for n in names if matcher.match(n))
    if bad:
        return f"env {', '.join(bad)} may not be set (loader or interpreter hooks)"
    return ""


def refusal(policy: NodePolicy | None, ask: PolicyAsk) -> str:
    """Why a node with `policy` refuses `ask`; "" when it accepts. None: no stated policy."""
    if policy is None:
        return ""
    if policy.executors and ask.executor not in policy.executors:
        return f"executor {ask.executor} not offered"
    if ask.trivial:
        return ""
    images = policy.allowed_images
    if ask.executor == "docker" and ask.image and "*" not in images and not any(
        fnmatchcase(ask.image, pat) for pat in images
    ):
        return f"image {ask.image!r} does not match the allowed images {policy.allowed_images}"
    for spec in ask.volumes:
        why = volume_refusal(spec, policy.allowed_volumes)
        if why:
            return why
    return env_refusal(ask.env_names, policy.forbidden_env)
