"""The whole mesh over TLS: a private CA and a server certificate made here with openssl, a
coordinator process serving HTTPS and WSS, a client that verifies it with MESH_CA_FILE, and a
client without the CA that refuses the unverified certificate."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_HEADERS, Proc, free_port, wait_until

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def make_certs(d: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) for 127.0.0.1 and localhost."""
    ca_key, ca, key, csr, cert, ext = (d / n for n in (
        "ca.key", "ca.crt", "server.key", "server.csr", "server.crt", "server.ext"))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*argv: str) -> None:
        subprocess.run(["openssl", *argv], check=True, capture_output=True)

    run("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
        "-subj", "/CN=gpumesh test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return ca, cert, key


async def _exit_code(proc: Proc) -> int:
    popen = proc.popen
    assert popen is not None
    await wait_until(lambda: popen.poll() is not None, 30, "the client to exit")
    return popen.returncode


@pytest.mark.slow
async def test_mesh_end_to_end_over_tls(
    tmp_path: Path, spawn_coordinator: Any, spawn_client: Any
) -> None:
    ca, cert, key = make_certs(tmp_path)
    port = free_port()
    coord = spawn_coordinator(port, tmp_path / "data", MESH_TLS_CERT=str(cert),
                              MESH_TLS_KEY=str(key))
    verify = ssl.create_default_context(cafile=str(ca))
    async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{port}", verify=verify,
                                 headers=ADMIN_HEADERS, timeout=30) as http:

        async def healthy() -> bool:
            assert coord.popen.poll() is None, coord.output()
            try:
                return (await http.get("/health")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_until(healthy, 30, "the TLS coordinator")
        async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{port}") as unverified:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await unverified.get("/health")

        spawn_client("tls1", f"wss://127.0.0.1:{port}", MESH_CA_FILE=str(ca))
        spawn_client("tls2", f"https://localhost:{port}", MESH_CA_FILE=str(ca))

        async def online() -> bool:
            nodes = (await http.get("/mesh/nodes")).json()["nodes"]
            return all(nodes.get(n, {}).get("status") == "online" for n in ("tls1", "tls2"))

        await wait_until(online, 30, "both TLS clients online")
        ids = []
        for _ in range(4):
            r = await http.post("/tasks/submit", json={"task_type": "custom",
                                                      "script": "echo over-tls"})
            assert r.status_code == 200, r.text
            ids.append(r.json()["task_id"])
        for task_id in ids:
            doc = (await http.get(f"/tasks/{task_id}", params={"wait": "20"})).json()
            assert doc["status"] == "completed", doc
            assert "over-tls" in doc["result"]["output"]

    stranger = spawn_client("tls3", f"wss://127.0.0.1:{port}")  # no CA: must not connect
    assert await _exit_code(stranger) == 2, stranger.output()
    assert "CERTIFICATE_VERIFY_FAILED" in stranger.output()
