"""`python -m gpu_client` / `gpumesh-client`: join the mesh and run what it assigns.

Exit status: 0 after SIGTERM or SIGINT (running process tasks are left to the next client),
2 for bad settings or when the coordinator refuses this node for good (bad token, protocol).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping

from gpu_client.agent import EXIT_FATAL, Agent
from gpu_client.credential import private_state_dir
from gpu_client.detect import GpuSource, make_source
from gpu_client.executors import load_executors
from gpu_client.isolation import detect as detect_isolation
from gpu_client.settings import ClientSettings
from shared.config import ConfigError, env_str

log = logging.getLogger("gpu_client")


async def serve(settings: ClientSettings, source: GpuSource) -> int:
    """Run one agent until a signal or a fatal refusal; returns the exit status."""
    # The credential and the launch journal live there: the node's alone (0700).
    await asyncio.to_thread(private_state_dir, settings.state_dir.expanduser())
    executors = await load_executors(settings, source)
    isolation = await asyncio.to_thread(detect_isolation, settings)  # logs what it means
    agent = Agent(settings, source, executors, isolation)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stop)
    log.info(
        "node %s connecting to %s; executors: %s; isolation: %s", settings.node_name,
        "a coordinator found by mDNS" if settings.discover else settings.ws_url,
        ", ".join(executors), isolation, extra={"node": settings.node_name},
    )
    try:
        return await agent.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def main(env: Mapping[str, str] | None = None) -> None:
    env = os.environ if env is None else env
    logging.basicConfig(
        level=env_str(env, "MESH_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("websockets").setLevel(logging.WARNING)
    try:
        settings = ClientSettings.from_env(env)
        source = make_source(env)
    except (ConfigError, ValueError) as exc:  # ConfigError is a ValueError; so are fake-GPU specs
        print(f"gpumesh-client: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_FATAL) from None
    raise SystemExit(asyncio.run(serve(settings, source)))


if __name__ == "__main__":
    main()
