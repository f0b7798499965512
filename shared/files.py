"""Task files in, artifacts out: the limits and the checks both ends share. Pure; no I/O.

A submission may carry `files`: a map from a relative path to its content, a string (UTF-8
text) or `{"base64": "..."}` (bytes). They are written into the task's working directory (the
process executor's attempt dir; `/workspace` in a container) before it starts. `artifacts`
lists relative paths or globs (`*.pt`, `out/**/*.json`) in that directory; after the task the
node collects the regular files they match (symlinks never), uploads them to the coordinator
and the result lists them (name, size, sha256). `GET /tasks/{id}/artifacts/{name}` serves them.

Names are relative POSIX paths under the working directory: no absolute path, no `..` or `.`
component, no empty component, no NUL or backslash, at most MAX_NAME characters and MAX_DEPTH
components. A few top-level names belong to the process executor's bookkeeping (RESERVED).
"""

from __future__ import annotations

import base64
import binascii
import re
import shlex
from pathlib import PurePosixPath
from typing import Any

import msgspec

MAX_FILES = 64  # input files per task
MAX_FILES_BYTES = 768 << 10  # their decoded total: the assign frame (1 MiB) carries them
MAX_ARTIFACT_PATTERNS = 32  # entries in `artifacts`
MAX_ARTIFACT_FILES = 32  # files collected per attempt; more are cut, and the result says so
MAX_ARTIFACT_BYTES = 8 << 20  # one artifact; a bigger file is left out, and the result says so
MAX_ARTIFACTS_TOTAL = 32 << 20  # all of one attempt's artifacts together
MAX_NAME = 255  # characters in a file name or artifact pattern
MAX_DEPTH = 8  # path components
NAME_MAX_BYTES = 255  # one path component in UTF-8: NAME_MAX of Linux file systems
PATH_MAX_BYTES = 4096  # a whole name in UTF-8 with its NUL: the kernel's PATH_MAX
WORKSPACE = "/workspace"  # a container's working dir when its task has files or artifacts
# The process executor's own files in an attempt's directory: a task file may not replace them.
RESERVED = frozenset({"meta.json", "meta.tmp", "output.log", "exit_code", "exit_code.tmp", "pid"})
# Every name the process executor and its wrapper shell use in an attempt's directory: a task
# file may not be one, nor be under one (`pid.tmp/x` makes a directory the wrapper cannot
# replace). Checked at submit for process tasks (`bookkeeping_problem`) and again on the node.
EXECUTOR_NAMES = RESERVED | {"pid.tmp", "signalled"}
_GLOB = re.compile(r"[*?\[]")


class Base64File(msgspec.Struct, forbid_unknown_fields=True):
    """A binary input file: `{"base64": "<standard base64>"}`."""

    base64: str


FileContent = str | Base64File


class ArtifactRef(msgspec.Struct, kw_only=True):
    """One stored artifact as a result lists it."""

    name: str
    size: int
    sha256: str


def name_problem(name: str, what: str = "file name") -> str | None:
    """Why `name` is not a safe relative path under the working dir, or None."""
    if not name:
        return f"{what} is empty"
    if len(name) > MAX_NAME:
        return f"{what} {name[:40]!r}...: longer than {MAX_NAME} characters"
    if "\x00" in name or "\\" in name:
        return f"{what} {name!r}: NUL and backslash are not allowed"
    if name.startswith("/"):
        return f"{what} {name!r}: must be relative to the task's working directory"
    parts = name.split("/")
    if len(parts) > MAX_DEPTH:
        return f"{what} {name!r}: more than {MAX_DEPTH} path components"
    if any(p in ("", ".", "..") for p in parts):
        return f"{what} {name!r}: no empty, `.` or `..` components"
    if len(parts) == 1 and name in RESERVED:
        return f"{what} {name!r}: reserved for the executor ({', '.join(sorted(RESERVED))})"
    return None


def name_bytes_problem(name: str, what: str = "file name") -> str | None:
    """Why a file system cannot hold `name` (a `name_problem`-clean relative path), or None:
    a component over NAME_MAX_BYTES or the whole over PATH_MAX_BYTES with its NUL, in UTF-8
    (200 × "é" is 200 characters but 400 bytes)."""
    raw = name.encode("utf-8", "surrogatepass")
    if len(raw) + 1 > PATH_MAX_BYTES:
        return (f"{what} {name[:40]!r}...: {len(raw)} bytes in UTF-8, over the "
                f"{PATH_MAX_BYTES}-byte path limit (PATH_MAX, with its NUL)")
    for part in raw.split(b"/"):
        if len(part) > NAME_MAX_BYTES:
            shown = part.decode("utf-8", "replace")[:40]
            return (f"{what} {name[:40]!r}: component {shown!r}... is {len(part)} bytes in "
                    f"UTF-8, over the {NAME_MAX_BYTES}-byte limit of a file name (NAME_MAX)")
    return None


def bookkeeping_problem(name: str) -> str | None:
    """Why a process task's file `name` would replace the executor's own files, or None."""
    top = name.split("/", 1)[0]
    if top in EXECUTOR_NAMES:
        names = ", ".join(sorted(EXECUTOR_NAMES))
        return f"file name {name!r}: {top!r} is the process executor's own ({names})"
    return None


def decode_content(content: FileContent) -> bytes:
    """The bytes of one file; raises ValueError for bad base64."""
    if isinstance(content, str):
        return content.encode("utf-8")
    try:
        return base64.b64decode(content.base64, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"not valid base64: {exc}") from exc


def files_problem(files: dict[str, FileContent]) -> str | None:
    """Why a submission's `files` cannot be sent, or None."""
    if len(files) > MAX_FILES:
        return f"`files`: {len(files)} files, more than {MAX_FILES}"
    total = 0
    for name, content in files.items():
        if why := name_problem(name):
            return f"`files`: {why}"
        try:
            total += len(decode_content(content))
        except ValueError as exc:
            return f"`files`: {name!r}: {exc}"
    if total > MAX_FILES_BYTES:
        return f"`files`: {total} bytes in all, more than {MAX_FILES_BYTES}"
    names = set(files)
    for name in names:  # `a` as a file and `a/b` as another cannot both be written
        for parent in PurePosixPath(name).parents:
            if str(parent) in names:
                return f"`files`: {str(parent)!r} is a file, so {name!r} cannot be under it"
    return None


def artifacts_problem(patterns: list[str]) -> str | None:
    """Why a submission's `artifacts` cannot be collected, or None."""
    if len(patterns) > MAX_ARTIFACT_PATTERNS:
        return f"`artifacts`: {len(patterns)} entries, more than {MAX_ARTIFACT_PATTERNS}"
    for p in patterns:
        if why := name_problem(p, "artifact pattern"):
            return f"`artifacts`: {why}"
    return None


def is_glob(pattern: str) -> bool:
    return _GLOB.search(pattern) is not None


_SCRIPT_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]*")
_INTERPRETERS = {".py": ("python3", "python"), ".sh": ("sh", "sh"), ".bash": ("bash", "bash")}


def script_command(script: str, files: dict[str, Any], executor: str) -> str | None:
    """The shell command that runs `script` when it names a file, or None when it is a shell
    command to run as it is. A `.py` file runs with python3 (`python` in a container), `.sh`
    with sh, `.bash` with bash, another sent file as `./name` (its `#!` line decides).

    A `.py`/`.sh`/`.bash` name that was not sent is still accepted (the seed's own example,
    `"script": "train_model.py"`, sends no file): it may be in the image's working dir; if it
    is not there either, the task fails with exit code 127 and a line saying to send it."""
    name = script.strip()
    if not _SCRIPT_FILE.fullmatch(name):
        return None
    suffix = PurePosixPath(name).suffix
    local, in_image = _INTERPRETERS.get(suffix, ("", ""))
    interpreter = in_image if executor == "docker" else local
    if name not in files:
        if not interpreter:
            return None
        here = shlex.quote(f"./{name}")
        why = shlex.quote(f"gpumesh: {name} is not in the task's working dir: send it in "
                          f'`files` ("files": {{"{name}": "<its text>"}})')
        return f"[ -f {here} ] || {{ echo {why} >&2; exit 127; }}; exec {interpreter} {here}"
    if name_problem(name) is not None:
        return None
    return f"{interpreter} ./{name}" if interpreter else f"./{name}"


def executable(name: str, content: bytes) -> bool:
    """Is a written file made executable? Those that start with `#!`."""
    return content.startswith(b"#!")
