"""A task's files in its working directory before it starts, its artifacts out after it ends.

Blocking file and tar work: call through asyncio.to_thread. The process executor writes the
files into the attempt's directory and collects from it (`write_inputs`, `collect`); the docker
executor puts them into the container as a tar (`inputs_tar`) and reads artifacts back from
`get_archive` streams (`extract`). Both match patterns the same way (`matches`: `*`, `?` and
`[...]` within one component, `**` across any number), take regular files only (a symlink is
never followed, so a task cannot make the node upload its secrets) and keep to the limits of
shared/files.py; what was left out is said in `Collected.notes`, which the result carries.
"""

from __future__ import annotations

import fnmatch
import io
import os
import posixpath
import shutil
import stat
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from docker.errors import NotFound

from shared.files import (
    MAX_ARTIFACT_BYTES,
    MAX_ARTIFACT_FILES,
    MAX_ARTIFACTS_TOTAL,
    WORKSPACE,
    FileContent,
    decode_content,
    executable,
    is_glob,
    name_bytes_problem,
    name_problem,
)

MAX_WALK = 100_000  # directory entries looked at per attempt while matching globs
MAX_TAR_READ = 4 * MAX_ARTIFACTS_TOTAL  # bytes read from one get_archive stream at most


@dataclass
class Collected:
    """Artifacts found after an attempt: (name, host path, size), and what was left out."""

    files: list[tuple[str, Path, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    total: int = 0
    seen: set[str] = field(default_factory=set)  # every match, kept or left out

    def take(self, name: str, path: Path, size: int) -> bool:
        """Keep one file if the limits allow; else note why not. False: stop looking."""
        self.seen.add(name)
        if any(n == name for n, _, _ in self.files):
            return True
        if len(self.files) >= MAX_ARTIFACT_FILES:
            self.notes.append(f"more than {MAX_ARTIFACT_FILES} artifacts: {name} and later "
                              "ones left out")
            return False
        if size > MAX_ARTIFACT_BYTES:
            self.notes.append(f"{name}: {size} bytes, over the {MAX_ARTIFACT_BYTES}-byte limit "
                              "per artifact: left out")
            return True
        if self.total + size > MAX_ARTIFACTS_TOTAL:
            self.notes.append(f"{name}: would pass the {MAX_ARTIFACTS_TOTAL}-byte limit per "
                              "task: left out")
            return True
        self.files.append((name, path, size))
        self.total += size
        return True


def matches(name: str, pattern: str) -> bool:
    """Does the relative path `name` match `pattern` (`**` spans components)?"""
    return _match(name.split("/"), pattern.split("/"))


def _match(parts: list[str], pats: list[str]) -> bool:
    if not pats:
        return not parts
    if pats[0] == "**":
        return any(_match(parts[i:], pats[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pats[0]) and _match(parts[1:], pats[1:])


# --- the process executor: the attempt's directory on this host --------------------------


def write_inputs(root: Path, files: dict[str, FileContent],
                 owner: tuple[int, int] | None = None) -> None:
    """Write the task's files under `root` (a fresh directory the task's user has no access
    to yet), then hand `root` and everything in it to `owner` (uid, gid) when given, `root`
    itself last. Every name is opened relative to its directory's file descriptor, never
    through a symlink (`O_NOFOLLOW`, directories opened with `O_DIRECTORY | O_NOFOLLOW`),
    files with `O_EXCL`; ownership is set on the open descriptors, so nothing a task planted
    can make the (root) client write or chown outside `root`. Raises ValueError for a bad name
    (the coordinator checked them; a node checks again), OSError for the disk."""
    top = os.open(root, _DIR_FLAGS)
    try:
        for name, content in files.items():
            if why := name_problem(name):
                raise ValueError(why)
            data = decode_content(content)
            *dirs, base = name.split("/")
            fds = [top]
            try:
                for part in dirs:
                    try:
                        os.mkdir(part, 0o755, dir_fd=fds[-1])
                    except FileExistsError:
                        pass
                    fds.append(os.open(part, _DIR_FLAGS, dir_fd=fds[-1]))
                mode = 0o755 if executable(name, data) else 0o644
                fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, mode, dir_fd=fds[-1])
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    os.fchmod(f.fileno(), mode)  # whatever the umask
                    if owner:
                        os.fchown(f.fileno(), *owner)
                if owner:
                    for dfd in fds[1:]:
                        os.fchown(dfd, *owner)
            finally:
                for dfd in fds[1:]:
                    os.close(dfd)
        if owner:
            os.fchown(top, *owner)  # last: until now the task's user could not enter
    finally:
        os.close(top)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def collect(root: Path, patterns: list[str]) -> Collected:
    """The regular files under `root` that `patterns` name, within the limits."""
    found = Collected()
    if not patterns:
        return found
    names = _walk(root, found)
    for pattern in patterns:
        hits = [n for n in names if matches(n, pattern)]
        if not hits:
            found.notes.append(f"{pattern}: no such file" if not is_glob(pattern)
                               else f"{pattern}: matched no file")
        for name in hits:
            if not found.take(name, root / name, names[name]):
                return found
    return found


def _walk(root: Path, found: Collected) -> dict[str, int]:
    """Relative name -> size of every regular file under root (symlinks skipped), sorted."""
    out: dict[str, int] = {}
    seen = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for fname in sorted(filenames):
            seen += 1
            if seen > MAX_WALK:
                found.notes.append(f"more than {MAX_WALK} entries in the working dir: the "
                                   "rest were not looked at")
                return out
            full = Path(dirpath) / fname
            rel = full.relative_to(root).as_posix()
            try:
                st = os.lstat(full)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and name_problem(rel) is None:
                out[rel] = st.st_size
    return out


# --- the docker executor: tars in and out of the container ---------------------------------


def inputs_tar(files: dict[str, FileContent], top: str) -> bytes:
    """A tar holding `top/` (mode 0777: the image's user may write its outputs there) and
    the files under it, for `put_archive(container, "/", ...)`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        dirs = {top} | {posixpath.join(top, posixpath.dirname(n)) for n in files}
        for d in sorted(dirs):
            for i in range(1, d.count("/") + 2):
                _add_dir(tar, "/".join(d.split("/")[:i]))
        for name, content in files.items():
            if why := name_problem(name):
                raise ValueError(why)
            data = decode_content(content)
            info = tarfile.TarInfo(posixpath.join(top, name))
            info.size, info.mode = len(data), 0o755 if executable(name, data) else 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    if name in tar.getnames():
        return
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o777
    tar.addfile(info)


def fetch_roots(patterns: list[str]) -> list[str]:
    """The paths (relative; "" is the working dir) to fetch so that every pattern can be
    matched: a plain path itself, a glob's part before its first glob component. A root
    under another root is dropped."""
    roots = {"/".join(_until_glob(p.split("/"))) for p in patterns}
    kept: list[str] = []
    for r in sorted(roots, key=len):
        if not any(r == k or k == "" or r.startswith(k + "/") for k in kept):
            kept.append(r)
    return kept


def _until_glob(parts: list[str]) -> Iterator[str]:
    for c in parts:
        if is_glob(c) or c == "**":
            return
        yield c


def extract(
    chunks: Iterable[bytes], root: str, patterns: list[str], dest: Path, found: Collected
) -> None:
    """Read one `get_archive` stream of `<workdir>/<root>` and keep the regular files that
    match under `dest`. Member names start with the root's own last component."""
    stream = _ChunkReader(chunks, MAX_TAR_READ)
    parent = posixpath.dirname(root)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                rel = member.name.split("/", 1)[1] if not root and "/" in member.name else (
                    posixpath.join(parent, member.name) if root else "")
                if not member.isreg() or not rel or name_problem(rel) is not None:
                    continue
                if not any(matches(rel, p) for p in patterns):
                    continue
                if any(n == rel for n, _, _ in found.files):
                    continue
                if not _keep(tar, member, rel, dest, found):
                    return
    except _TooMuch:
        found.notes.append(f"stopped reading {root or 'the working dir'} after "
                           f"{MAX_TAR_READ} bytes: later matches left out")


def _keep(tar: tarfile.TarFile, member: tarfile.TarInfo, rel: str, dest: Path,
          found: Collected) -> bool:
    path = dest / rel
    if not found.take(rel, path, member.size):
        return False
    if found.files and found.files[-1][0] == rel:
        src = tar.extractfile(member)
        assert src is not None
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
    return True


class _TooMuch(Exception):
    pass


class _ChunkReader(io.RawIOBase):
    """A file over an iterator of byte chunks, refusing to read past `limit` bytes."""

    def __init__(self, chunks: Iterable[bytes], limit: int) -> None:
        self._it, self._buf, self._read, self._limit = iter(chunks), b"", 0, limit

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buf:
            try:
                self._buf = next(self._it)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n], self._buf = self._buf[:n], self._buf[n:]
        self._read += n
        if self._read > self._limit:
            raise _TooMuch
        return n


def collect_from_container(api: Any, cid: str, patterns: list[str], dest: Path) -> Collected:
    """Blocking: the artifacts of an ended container, read with `get_archive` from its
    working dir (WORKSPACE) into `dest`, one archive per fetch root."""
    found = Collected()
    if not patterns:
        return found
    shutil.rmtree(dest, ignore_errors=True)  # a leftover of an earlier try
    dest.mkdir(parents=True, exist_ok=True)
    for root in fetch_roots(patterns):
        if root and (why := name_bytes_problem(root, "artifact path")):
            found.notes.append(f"{why}: not looked for")  # the engine would answer 500
            continue
        try:
            stream, _ = api.get_archive(cid, posixpath.join(WORKSPACE, root) if root
                                        else WORKSPACE, chunk_size=1 << 20)
        except NotFound:
            continue  # nothing there: the patterns under it are noted below
        extract(stream, root, patterns, dest, found)
    for p in patterns:
        if not any(matches(n, p) for n in found.seen):
            found.notes.append(f"{p}: no such file" if not is_glob(p) else f"{p}: matched no file")
    return found
