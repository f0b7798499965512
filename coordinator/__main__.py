"""`python -m coordinator` / `gpumesh-coordinator`: run the lead node."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from pathlib import Path

import uvicorn

from coordinator.settings import Settings
from coordinator.storage.datadir import DataDirInUse, lock_data_dir, tighten_data_dir
from coordinator.storage.schema import SchemaTooNew, preflight
from coordinator.web.app import create_app
from coordinator.web.slowloris import head_deadline_protocol
from shared.config import ConfigError
from shared.protocol import MAX_FRAME_BYTES


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpumesh-coordinator", description=__doc__)
    p.add_argument("--host", help="bind address (env MESH_HOST, default 0.0.0.0)")
    p.add_argument("--port", type=int, help="port (env MESH_PORT, default 8001)")
    p.add_argument("--data-dir", type=Path, help="SQLite lives here (env MESH_DATA_DIR)")
    p.add_argument("--store", help="sqlite (default) or a postgresql:// URL (env MESH_STORE)")
    p.add_argument("--log-level", default=os.environ.get("MESH_LOG_LEVEL", "info"))
    p.add_argument("--tls-cert", type=Path, help="PEM certificate: serve HTTPS/WSS (MESH_TLS_CERT)")
    p.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert (MESH_TLS_KEY)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    # Whatever this process creates is its own: the data dir 0700, its files 0600 (tokens,
    # SQLite and its -wal/-shm, artifacts). Each place that creates one names its mode too.
    os.umask(0o077)
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = Settings.from_env(
            os.environ, host=args.host, port=args.port, data_dir=args.data_dir,
            tls_cert=args.tls_cert, tls_key=args.tls_key, store=args.store,
        )
        if (settings.tls_cert is None) != (settings.tls_key is None):
            raise ConfigError("MESH_TLS_CERT/MESH_TLS_KEY", "one of them", "both or neither")
    except ConfigError as exc:
        print(f"gpumesh-coordinator: {exc}", file=sys.stderr)
        sys.exit(2)
    try:
        held = lock_data_dir(settings.data_dir)  # noqa: F841 - held open while we run
        tighten_data_dir(settings.data_dir)  # what an older version or a hand left wider
    except (DataDirInUse, OSError) as exc:
        print(f"gpumesh-coordinator: {exc}", file=sys.stderr)
        sys.exit(2)
    try:
        preflight(settings.store, settings.data_dir)  # a schema newer than this code: refuse
    except SchemaTooNew as exc:
        print(f"gpumesh-coordinator: {exc}", file=sys.stderr)
        sys.exit(2)
    # A long-lived server holds one object graph per task and node: collect the young
    # generation less often and leave the old ones alone unless they grow a lot. With the
    # defaults, full collections at 10,000 nodes or 1M queued tasks paused the loop for
    # over a second (docs/benchmarks.md).
    gc.set_threshold(50_000, 20, 100)
    uvicorn.run(
        create_app(settings, freeze_gc=True),
        host=settings.host,
        port=settings.port,
        # httptools, with a deadline for each request head (coordinator/web/slowloris.py)
        http=head_deadline_protocol(settings.http_head_timeout_s, settings.max_http_pending),
        ws="websockets-sansio",
        ws_max_size=MAX_FRAME_BYTES,
        log_level=args.log_level.lower(),
        access_log=False,
        proxy_headers=False,  # no access log, nothing reads the client address: skip a layer
        timeout_graceful_shutdown=5,
        ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
    )


if __name__ == "__main__":
    main()
