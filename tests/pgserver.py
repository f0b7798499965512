"""A real PostgreSQL for tests: the Debian package's server in a temporary directory.

`PgServer` runs `initdb` and then `postgres` itself (no pg_ctl, so the test owns the process
and can stop it) as an unprivileged user, listening on 127.0.0.1 on a free port with trust
auth and no Unix socket outside its own directory. Use it through the fixtures:

    from tests.pgserver import pg_server, pg_dsn  # noqa: F401  (in a test module)

    async def test_x(pg_dsn: str) -> None:  # a fresh, empty database per test
        ...

`pg_server` is session-scoped (one server per pytest process); `pg_dsn` creates
`t_<uuid>` on it for each test. Nothing is skipped: without the binaries (CI installs the
`postgresql` package) the fixture fails with a line that says what is missing.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

PG_BIN_DIRS = [Path(f"/usr/lib/postgresql/{v}/bin") for v in (17, 16, 15, 14, 13)]
PG_USER = "gpumesh-pg"  # the system user the server runs as when the tests run as root
PG_ROLE = "gpumesh"  # the database superuser the DSNs name


def pg_bin_dir() -> Path:
    env = os.environ.get("MESH_TEST_PG_BIN")
    for d in [Path(env)] if env else PG_BIN_DIRS:
        if (d / "initdb").exists() and (d / "postgres").exists():
            return d
    raise RuntimeError(
        "PostgreSQL server binaries not found (looked in "
        f"{', '.join(str(d) for d in PG_BIN_DIRS)}): apt-get install postgresql, "
        "or point MESH_TEST_PG_BIN at the directory holding initdb and postgres"
    )


def _run_as() -> str | None:
    """The user to run the server as: PG_USER (created if missing) when root, else None."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
            check=True,
            capture_output=True,
        )
    return PG_USER


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """One PostgreSQL server process in its own temporary directory."""

    def __init__(self, *, fsync: bool = False) -> None:
        self.bindir = pg_bin_dir()
        self.user = _run_as()
        self.root = Path(tempfile.mkdtemp(prefix="gpumesh-pg-"))
        self.datadir = self.root / "data"
        self.port = free_port()
        self.fsync = fsync
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.root / "postgres.log"

    @property
    def dsn(self) -> str:
        return self.dsn_for("postgres")

    def dsn_for(self, db: str) -> str:
        return f"postgresql://{PG_ROLE}@127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 30.0) -> None:
        if self.user is not None:
            shutil.chown(self.root, self.user)
        subprocess.run(
            [str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", PG_ROLE,
             "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"],
            check=True, capture_output=True, user=self.user, cwd=self.root,
        )
        self.resume(timeout)

    def resume(self, timeout: float = 30.0) -> None:
        """Start the server process on the existing data directory (after `halt`)."""
        args = [
            str(self.bindir / "postgres"), "-D", str(self.datadir),
            "-c", "listen_addresses=127.0.0.1", "-c", f"port={self.port}",
            "-c", f"unix_socket_directories={self.root}", "-c", "max_connections=200",
            "-c", "shared_buffers=32MB", "-c", f"fsync={'on' if self.fsync else 'off'}",
            "-c", "full_page_writes=off" if not self.fsync else "full_page_writes=on",
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, user=self.user, cwd=self.root,
                start_new_session=True,
            )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited ({self.proc.returncode}): {self.log_tail()}")
            try:
                with psycopg.connect(self.dsn, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"postgres not ready after {timeout}s: {self.log_tail()}"
                    ) from None
                time.sleep(0.05)

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def create_database(self) -> str:
        """A fresh empty database; returns its DSN."""
        name = f"t_{uuid.uuid4().hex}"
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn_for(name)

    def halt(self, how: signal.Signals = signal.SIGINT) -> None:
        """Stop the server process, keeping its data: SIGINT is a fast shutdown, SIGQUIT an
        immediate one (crash recovery on `resume`), SIGKILL of the postmaster a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(how)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # "fast" shutdown; SIGTERM waits for clients
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    server = PgServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_dsn(pg_server: PgServer) -> str:
    """The DSN of a fresh, empty database on the session's server."""
    return pg_server.create_database()
