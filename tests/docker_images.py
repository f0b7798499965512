"""Test images built here, once per machine: no registry is reachable, so nothing is pulled.

`busybox_image()` imports a rootfs holding Debian's static busybox and a link per applet
(sh, echo, sleep, cat, env, ls, printf, kill, ...) as `gpumesh-test-busybox:latest`. It is
built only when the engine does not have it yet. `docker_unavailable()` says why the
`docker`-marked tests must be skipped, or "" when an engine answers.
"""

from __future__ import annotations

import functools
import gc
import io
import shutil
import subprocess
import tarfile
import warnings
from pathlib import Path

import docker
import pytest
from docker.errors import DockerException, ImageNotFound
from requests.exceptions import RequestException

BUSYBOX_IMAGE = "gpumesh-test-busybox:latest"
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")


@functools.cache
def docker_unavailable() -> str:
    """Why no Docker engine can be used here ("" when one answers ping)."""
    why = ""
    # With no engine, docker-py's constructor raises holding its open socket, which then
    # warns when collected, inside whichever test runs next: dropped here, quietly.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client = docker.from_env(timeout=10)
            try:
                client.ping()
            finally:
                client.close()
        except (DockerException, RequestException) as exc:
            why = f"no Docker engine answers (`docker info` fails): {exc}"
        gc.collect()
    if why:
        return why
    if _busybox() is None:
        return "no static busybox to build the test image (apt-get install busybox-static)"
    return ""


def requires_docker() -> list[pytest.MarkDecorator]:
    """`pytestmark = requires_docker()`: marked `docker`, skipped with the reason if absent."""
    why = docker_unavailable()
    return [pytest.mark.docker, pytest.mark.skipif(bool(why), reason=why or "engine answers")]


def _busybox() -> Path | None:
    for candidate in BUSYBOX_CANDIDATES:
        path = Path(candidate)
        if path.is_file() and _is_static(path):
            return path
    found = shutil.which("busybox")
    return Path(found) if found and _is_static(Path(found)) else None


def _is_static(path: Path) -> bool:
    # A dynamically linked busybox would need a libc in the image; its ELF header says so.
    data = path.read_bytes()[:4096]
    return b"/lib64/ld-linux" not in data and b"/lib/ld-" not in data


def _rootfs_tar(busybox: Path) -> bytes:
    applets = subprocess.run(
        [str(busybox), "--list"], check=True, capture_output=True, text=True
    ).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in ("bin", "tmp", "etc", "data"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add(str(busybox), arcname="bin/busybox")
        for applet in applets:
            if applet == "busybox":
                continue
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
        passwd = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n"
        entry = tarfile.TarInfo("etc/passwd")
        entry.size = len(passwd)
        tar.addfile(entry, io.BytesIO(passwd))
    return buf.getvalue()


@functools.cache
def busybox_image() -> str:
    """The tag of the busybox test image, imported now unless the engine already has it."""
    client = docker.from_env(timeout=60)
    try:
        try:
            client.images.get(BUSYBOX_IMAGE)
            return BUSYBOX_IMAGE
        except ImageNotFound:
            pass
        busybox = _busybox()
        if busybox is None:
            raise RuntimeError("no static busybox (apt-get install busybox-static)")
        repo, tag = BUSYBOX_IMAGE.split(":")
        client.api.import_image_from_data(_rootfs_tar(busybox), repository=repo, tag=tag)
        client.images.get(BUSYBOX_IMAGE)  # raises if the import did not take
        return BUSYBOX_IMAGE
    finally:
        client.close()
