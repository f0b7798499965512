"""Advertise the coordinator on the local network: DNS-SD over multicast DNS.

Service type `_gpumesh._tcp.local.`, instance `<mesh> on <host>:<port>`, the port the API and
`/ws` listen on, and TXT records `scheme=ws|wss`, `mesh=<MESH_NAME>`, `proto=<protocol
version>`, `path=/ws`. Clients without `MESH_COORDINATOR_URL` browse for it
(gpu_client/discover.py); `gpumesh discover` lists what a machine sees.

Which addresses: those the server is bound to (every non-loopback IPv4 address of this host
for 0.0.0.0), or `MESH_ADVERTISE_ADDRESSES`. A coordinator bound to loopback only is never
advertised (nobody else could reach it), nor with `MESH_ADVERTISE=off`. IPv4 only. Being
found is not being trusted: a node still checks the join-token proof (shared/proof.py).
Withdrawn (goodbye packets, TTL 0) when the coordinator stops.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import Any

import ifaddr
from zeroconf import InterfaceChoice, IPVersion, NonUniqueNameException, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

from coordinator.settings import Settings
from shared.protocol import PROTOCOL_VERSION

log = logging.getLogger(__name__)

SERVICE_TYPE = "_gpumesh._tcp.local."
WS_PATH = "/ws"


def mesh_name(settings: Settings) -> str:
    """The name nodes choose a mesh by: MESH_NAME, else the coordinator's NODE_NAME."""
    return settings.mesh_name or settings.name


def _loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return addr in ("localhost", "")


def host_addresses() -> list[str]:
    """Every non-loopback IPv4 address of this host's interfaces, sorted."""
    found = {
        str(ip.ip) for adapter in ifaddr.get_adapters() for ip in adapter.ips
        if ip.is_IPv4 and not ipaddress.ip_address(str(ip.ip)).is_loopback
    }
    return sorted(found)


def interfaces_for(addresses: list[str]) -> list[str] | InterfaceChoice:
    """Announce on the interfaces that hold the advertised addresses; on all of them when
    none does (MESH_MDNS_ADDRESSES naming a NAT or proxy address). Blocking."""
    local = {str(ip.ip) for a in ifaddr.get_adapters() for ip in a.ips if ip.is_IPv4}
    return [a for a in addresses if a in local] or InterfaceChoice.All


def addresses_to_advertise(settings: Settings) -> tuple[list[str], str]:
    """(the IPv4 addresses to advertise, why none if the list is empty). Blocking (reads
    the interfaces): call through asyncio.to_thread."""
    if not settings.mdns:
        return [], "MESH_ADVERTISE=off"
    if settings.mdns_addresses:
        return list(settings.mdns_addresses), ""
    host = settings.host.strip()
    if host in ("0.0.0.0", "", "::"):
        found = host_addresses()
        return found, "" if found else "no non-loopback IPv4 address on this host"
    if _loopback(host):
        return [], f"bound to loopback only ({host}): nobody else could reach it"
    try:
        return [str(ipaddress.IPv4Address(host))], ""
    except ValueError:
        return [], f"bound to {host!r}, not an IPv4 address (set MESH_ADVERTISE_ADDRESSES)"


def service_info(settings: Settings, addresses: list[str]) -> ServiceInfo:
    mesh = mesh_name(settings)
    host = socket.gethostname().split(".")[0] or "gpumesh"
    instance = f"{mesh} on {host}:{settings.port}".encode()[:63].decode(errors="ignore")
    return ServiceInfo(
        SERVICE_TYPE,
        f"{instance}.{SERVICE_TYPE}",
        port=settings.port,
        properties={
            "scheme": "wss" if settings.tls_cert else "ws",
            "mesh": mesh,
            "proto": str(PROTOCOL_VERSION),
            "path": WS_PATH,
        },
        server=f"{host}.local.",
        parsed_addresses=addresses,
    )


class Advertiser:
    """Registers the service in the background (probing takes about a second, the
    coordinator is serving meanwhile) and withdraws it on `stop`. While it advertises,
    `state.mdns_endpoints` holds the `address:port`s a node that found us may have dialed
    (coordinator/link/join_proof.py refuses to prove itself through any other)."""

    def __init__(self, settings: Settings, state: Any) -> None:
        self._settings = settings
        self._state = state
        state.mdns_endpoints = frozenset()
        self._zc: AsyncZeroconf | None = None
        self._task: asyncio.Task[None] | None = None
        self.info: ServiceInfo | None = None

    async def start(self) -> None:
        addresses, why = await asyncio.to_thread(addresses_to_advertise, self._settings)
        if not addresses:
            log.info("not advertised on the local network: %s", why)
            return
        self.info = service_info(self._settings, addresses)
        self._state.mdns_endpoints = frozenset(f"{a}:{self._settings.port}" for a in addresses)
        interfaces = await asyncio.to_thread(interfaces_for, addresses)
        self._zc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        self._task = asyncio.create_task(self._register(self.info), name="mdns-advertise")

    async def _register(self, info: ServiceInfo) -> None:
        assert self._zc is not None
        try:
            await (await self._zc.async_register_service(info, allow_name_change=True))
        except (NonUniqueNameException, OSError) as exc:
            log.warning("could not advertise %s on the local network: %s", info.name, exc)
            return
        log.info("advertised %r (mesh %s) at %s port %d", info.name,
                 (info.properties.get(b"mesh") or b"").decode(),
                 ", ".join(info.parsed_addresses()), info.port)

    async def stop(self) -> None:
        self._state.mdns_endpoints = frozenset()
        if self._zc is None:
            return
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self._zc.async_unregister_all_services()
            log.info("withdrew the local-network advertisement")
        except Exception:  # never keep the coordinator from stopping
            log.exception("withdrawing the local-network advertisement failed")
        finally:
            await self._zc.async_close()
            self._zc = None
