"""The node's credential: issued by the coordinator on the first registration, kept here.

One file per coordinator and node name in the state dir (`MESH_STATE_DIR`, default
`$XDG_STATE_HOME/gpumesh` or `~/.local/state/gpumesh`), mode 0600, replaced atomically; with
several coordinators (HA) the same credential is kept under each of them (one per mesh).
The state dir (the credential, the launch journal) is the client's alone: 0700, made so at
start (`private_state_dir`), its directories created 0700. Blocking file I/O: call through
asyncio.to_thread.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path

from shared.durable import fsync_dir

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")

log = logging.getLogger(__name__)


def private_state_dir(state_dir: Path) -> None:
    """At start: the state dir exists and only its owner may enter it (0700); a wider one,
    from an older version or a hand, is narrowed (logged). Its parents are left as they are."""
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    private_dirs(state_dir)
    try:
        st = os.lstat(state_dir)
        if stat.S_ISDIR(st.st_mode) and st.st_mode & 0o077:
            os.chmod(state_dir, stat.S_IMODE(st.st_mode) & ~0o077)
            log.warning("state dir %s was open to others (%o); now %o", state_dir,
                        stat.S_IMODE(st.st_mode), stat.S_IMODE(st.st_mode) & ~0o077)
    except OSError as exc:
        log.warning("cannot narrow the mode of the state dir %s: %s", state_dir, exc.strerror)


def private_dirs(path: Path) -> None:
    """`path` and its missing parents, each created 0700 (whatever the umask)."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for d in reversed(missing):
        d.mkdir(mode=0o700, exist_ok=True)
        os.chmod(d, 0o700)


def credential_path(state_dir: Path, coordinator_url: str, node_name: str) -> Path:
    """`<state>/credentials/<host_port>/<node>.credential`: a name per coordinator and node."""
    where = coordinator_url.split("://", 1)[-1]
    return state_dir / "credentials" / _UNSAFE.sub("_", where) / f"{node_name}.credential"


def credential_paths(state_dir: Path, urls: tuple[str, ...], node_name: str) -> list[Path]:
    """One credential per mesh: the paths under every coordinator URL of the mesh. A node
    reads the first that holds one and writes all of them, so reordering, adding or dropping
    a URL of MESH_COORDINATOR_URL keeps the credential (one URL: the same file as before)."""
    return [credential_path(state_dir, url, node_name) for url in urls]


def load_any(paths: list[Path]) -> str:
    """The mesh's credential from the first path that holds one, copied to those that do not
    (a URL added to the list), so that `paths[0]` always holds it once one is known."""
    for path in paths:
        if credential := load_credential(path):
            for other in paths:
                if other != path and load_credential(other) != credential:
                    save_credential(other, credential)
            return credential
    return ""


def save_all(paths: list[Path], credential: str) -> None:
    for path in paths:
        save_credential(path, credential)


def join_token(token: str, token_file: Path | None) -> str:
    """MESH_TOKEN, else the contents of MESH_TOKEN_FILE (read at each register: a coordinator
    starting beside this client may write it a moment later), else ""."""
    if token or token_file is None:
        return token
    return load_credential(token_file)


def load_credential(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


def save_credential(path: Path, credential: str) -> None:
    """Write it durably with mode 0600 (the directory 0700), replacing any older one."""
    private_dirs(path.parent)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(credential + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
