"""Find the coordinator on the local network (DNS-SD over multicast DNS), and join it.

Only when `MESH_COORDINATOR_URL` is unset (the URL always wins; `MESH_DISCOVERY=off` keeps
the old `ws://localhost:8001`). The client browses for `_gpumesh._tcp.local.` for as long as
it runs, so a coordinator that starts after the node, or comes back at another address, is
found again. Which one it joins (`choose`): those whose TXT `mesh` equals `MESH_NAME`; with
no `MESH_NAME`, the only mesh it sees once it has listened SETTLE_S after the first answer
(several meshes: it logs them and waits, it never picks one at random). Candidates of that
mesh are tried in turn, the most recently announced first, each at every address it
advertises, those on this host's networks first.

Found is not trusted: every discovered coordinator must prove the join token in the
handshake (shared/proof.py, gpu_client/handshake.py) before the node sends `register`. One
that does not is logged with the reason and passed over for `REFUSED_HOLD_S`; the node moves
on to the next candidate at once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import ifaddr
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from gpu_client.endpoints import reconnect_delays
from gpu_client.handshake import Unproven, proving
from gpu_client.settings import ClientSettings
from shared.protocol import MAX_FRAME_BYTES, SUPPORTED_PROTOCOLS

log = logging.getLogger(__name__)

SERVICE_TYPE = "_gpumesh._tcp.local."
RESOLVE_TIMEOUT_MS = 3000
REFUSED_HOLD_S = 60.0  # a coordinator that failed the proof is not tried again before this
SETTLE_S = 2.0  # with no MESH_NAME: listen this long after the first answer before choosing


@dataclass(frozen=True, slots=True)
class Found:
    """One advertised coordinator."""

    name: str  # the DNS-SD instance name, e.g. "lab on gpu-box:8001"
    mesh: str
    proto: int | None
    scheme: str  # ws | wss
    path: str  # where node sockets live, "/ws"
    addresses: tuple[str, ...]
    port: int
    seen: float = field(default=0.0, compare=False)  # monotonic time it was last resolved

    @property
    def url(self) -> str:
        """The first advertised address's URL (what `gpumesh discover` shows)."""
        return self.urls()[0]

    def urls(self, networks: Iterable[ipaddress.IPv4Network] = ()) -> list[str]:
        """A URL per advertised address, those on a network of this host first (a
        multi-homed coordinator also advertises addresses this node cannot reach)."""
        nets = list(networks)
        on_link = sorted(self.addresses, key=lambda a: not any(
            ipaddress.IPv4Address(a) in n for n in nets))
        return [f"{self.scheme}://{a}:{self.port}" for a in on_link]

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        del doc["seen"]
        return {"url": self.url, **doc, "addresses": list(self.addresses)}


def parse(info: AsyncServiceInfo) -> Found | None:
    """A resolved record as `Found`; None without an IPv4 address or a usable scheme."""
    props = {k.decode(errors="replace"): (v or b"").decode(errors="replace")
             for k, v in info.properties.items()}
    addresses = tuple(info.parsed_addresses(IPVersion.V4Only))
    scheme = props.get("scheme", "ws")
    if not addresses or not info.port or scheme not in ("ws", "wss"):
        return None
    try:
        proto: int | None = int(props.get("proto", ""))
    except ValueError:
        proto = None
    path = props.get("path", "/ws")
    instance = info.name.removesuffix("." + SERVICE_TYPE)
    return Found(name=instance, mesh=props.get("mesh", ""), proto=proto, scheme=scheme,
                 path=path if path.startswith("/") else "/ws", addresses=addresses,
                 port=info.port, seen=time.monotonic())


class Browser:
    """Keeps `found` up to date from mDNS announcements; `changed` is set on every change."""

    def __init__(self) -> None:
        self.found: dict[str, Found] = {}
        self.changed = asyncio.Event()
        self.first_seen: float | None = None  # monotonic time of the first coordinator found
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._pending: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change]
        )

    async def close(self) -> None:
        for task in list(self._pending):
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            await self._zc.async_close()

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            gone = self.found.pop(name, None)
            if gone is not None:
                log.info("coordinator %r (mesh %s) at %s withdrew", gone.name, gone.mesh, gone.url)
                self.changed.set()
            return
        task = asyncio.get_running_loop().create_task(self._resolve(name))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _resolve(self, name: str) -> None:
        assert self._zc is not None
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT_MS):
            log.info("could not resolve %r: no answer in %d ms", name, RESOLVE_TIMEOUT_MS)
            return
        found = parse(info)
        if found is None:
            log.info("ignoring %r: no IPv4 address, port or ws/wss scheme", name)
            return
        if self.found.get(name) != found:
            log.info("found coordinator %r: mesh %s, protocol %s, %s", found.name, found.mesh,
                     found.proto, found.url)
        self.found[name] = found
        if self.first_seen is None:
            self.first_seen = found.seen
        self.changed.set()


async def browse(timeout_s: float) -> list[Found]:
    """What this machine sees within `timeout_s` (for `gpumesh discover`), sorted by mesh."""
    browser = Browser()
    await browser.start()
    try:
        await asyncio.sleep(timeout_s)  # answers arrive over this window; nothing to wait on
        await asyncio.gather(*browser._pending, return_exceptions=True)
    finally:
        await browser.close()
    return sorted(browser.found.values(), key=lambda f: (f.mesh, f.name))


@dataclass(frozen=True, slots=True)
class Choice:
    candidates: list[Found]  # to try in this order; empty: wait for the network to change
    why: str  # a sentence for the log


def choose(
    found: Iterable[Found], mesh_name: str, held: dict[str, float], now: float
) -> Choice:
    """Pure: which coordinators to try. `held`: URL -> monotonic time until which it is
    passed over (it failed the proof)."""
    usable = [f for f in found if f.proto is None or f.proto in SUPPORTED_PROTOCOLS]
    if mesh_name:
        mine = [f for f in usable if f.mesh == mesh_name]
        why = f"mesh {mesh_name!r} (MESH_NAME)"
    else:
        meshes = sorted({f.mesh for f in usable})
        if len(meshes) > 1:
            return Choice([], f"found {len(meshes)} meshes ({', '.join(meshes)}): set MESH_NAME "
                              "to choose one; waiting")
        mine = usable
        why = f"the only mesh in sight ({meshes[0]!r})" if meshes else ""
    ready = [f for f in mine if any(held.get(u, 0.0) <= now for u in f.urls())]
    if not ready:
        seen = ", ".join(sorted(f"{f.name} ({f.mesh})" for f in usable)) or "none"
        wanted = f"mesh {mesh_name!r}" if mesh_name else "a coordinator"
        extra = f"; {len(mine) - len(ready)} refused recently" if len(mine) > len(ready) else ""
        return Choice([], f"waiting for {wanted} (seen: {seen}{extra})")
    return Choice(sorted(ready, key=lambda f: (-f.seen, f.name)), f"trying {why}")


class Joiner(Protocol):
    """What joining a discovered coordinator needs of the node: gpu_client.agent.Agent,
    which imports this module (so this one names the methods instead of importing it)."""

    async def read_join_token(self) -> str: ...

    def use_coordinator(self, url: str, credential_key: str) -> None: ...

    async def serve_connection(self, ws: ClientConnection) -> bool: ...


def _tls(s: ClientSettings, found: Found) -> dict[str, Any]:
    if found.scheme != "wss":
        return {}
    ca = s.ca_file
    return {"ssl": ssl.create_default_context(cafile=str(ca) if ca else None)}


async def serve_discovered(agent: Joiner, s: ClientSettings) -> None:
    """The agent's connection loop when it has no URL: browse, choose, prove, serve; again
    when the session ends. Raises FatalClose when a proven coordinator refuses the node."""
    browser = Browser()
    await browser.start()
    log.info("no MESH_COORDINATOR_URL: looking for %s on the local network",
             f"mesh {s.mesh_name!r}" if s.mesh_name else "a gpumesh coordinator")
    held: dict[str, float] = {}
    backoff = reconnect_delays(s.reconnect_max_s)
    try:
        while True:
            choice = await _wait_for_candidates(browser, s.mesh_name, held)
            if await _try_all(agent, s, choice, held) == "registered":
                backoff = reconnect_delays(s.reconnect_max_s)
            await asyncio.sleep(next(backoff))
    finally:
        await browser.close()


async def _wait_for_candidates(browser: Browser, mesh: str, held: dict[str, float]) -> Choice:
    last = ""
    while True:
        browser.changed.clear()
        now = time.monotonic()
        choice = choose(browser.found.values(), mesh, held, now)
        # "The only mesh" only once the others had time to answer too (no MESH_NAME).
        settle = 0.0 if mesh or browser.first_seen is None else (
            browser.first_seen + SETTLE_S - now)
        if choice.candidates and settle <= 0:
            return choice
        if choice.why != last and not choice.candidates:
            log.info("%s", choice.why)
            last = choice.why
        wake = [t - now for t in held.values() if t > now] + ([settle] if settle > 0 else [])
        try:
            async with asyncio.timeout(min(wake) if wake else None):
                await browser.changed.wait()
        except TimeoutError:
            pass


def local_networks() -> list[ipaddress.IPv4Network]:
    """The IPv4 networks of this host's interfaces. Blocking: call through to_thread."""
    return [
        ipaddress.IPv4Network(f"{ip.ip}/{ip.network_prefix}", strict=False)
        for adapter in ifaddr.get_adapters() for ip in adapter.ips if ip.is_IPv4
    ]


async def _try_all(
    agent: Joiner, s: ClientSettings, choice: Choice, held: dict[str, float]
) -> str:
    """Each candidate's addresses in turn until one serves: the last outcome. A URL whose
    answer failed the proof is held for REFUSED_HOLD_S (it may be another host's address)."""
    networks = await asyncio.to_thread(local_networks)
    outcome = "failed"
    for found in choice.candidates:
        for url in found.urls(networks):
            if held.get(url, 0.0) > time.monotonic():
                continue
            outcome = await _try(agent, s, found, url, choice.why)
            if outcome == "refused":
                held[url] = time.monotonic() + REFUSED_HOLD_S
            elif outcome in ("registered", "closed"):
                return outcome
    return outcome


async def _try(agent: Joiner, s: ClientSettings, found: Found, url: str, why: str) -> str:
    """One connection to `url`: "refused" (no proof), "failed", "closed" or "registered"."""
    log.info("%s: %r at %s", why, found.name, url)
    try:
        ws = await connect(
            f"{url}{found.path}/{s.node_name}", max_size=MAX_FRAME_BYTES, open_timeout=10,
            close_timeout=5, compression=None,
            create_connection=proving(agent.read_join_token, s.node_name, discovered=True),
            **_tls(s, found),
        )
    except Unproven as exc:
        log.warning("refused coordinator %r at %s (mesh %s): %s; sent it nothing but the node "
                    "name and a nonce", found.name, url, found.mesh, exc.reason)
        return "refused"
    except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
        log.info("could not reach %r at %s: %s", found.name, url, exc)
        return "failed"
    agent.use_coordinator(url, f"mdns-{found.mesh}")
    return "registered" if await agent.serve_connection(ws) else "closed"
