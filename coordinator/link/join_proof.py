"""The coordinator's half of the join-token proof (the protocol is in shared/proof.py).

A node that sends a nonce in `X-Gpumesh-Nonce` gets the coordinator's proof in the 101
answer; its `register` must then carry the node's proof for the same exchange. A node that
sends no nonce (an older client) is checked by the `token` in its `register`, as before.
A node that says it found this coordinator by mDNS (`X-Gpumesh-Found: mdns`) must have
dialed an address this coordinator advertises; otherwise it reached us through something
else, a relay, and gets no proof (so it refuses to go on).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from starlette.websockets import WebSocket

from coordinator.link.identity import NodeIdentities
from shared.proof import FOUND_HEADER, NONCE_HEADER, PROOF_HEADER, binding, valid_nonce
from shared.protocol import Register, valid_node_name

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Challenge:
    """This connection's two nonces and binding ("" when no proof was given), and the
    headers of the 101 answer."""

    nonce_n: str = ""
    nonce_c: str = ""
    bound: str = ""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


def _advertised(ws: WebSocket, host: str) -> bool:
    """Is `host` (a Host header) one of the `address:port`s this coordinator advertises?"""
    endpoints: frozenset[str] = getattr(ws.app.state, "mdns_endpoints", frozenset())
    host = host.strip().lower()
    if ":" not in host.rsplit("]", 1)[-1]:
        host = f"{host}:{443 if ws.url.scheme == 'wss' else 80}"
    return host in endpoints


def _warning(key: str, msg: str, *args: object, **kwargs: Any) -> None:
    log.warning(msg, *args, **kwargs)


def answer(ws: WebSocket, ids: NodeIdentities, node: str) -> Challenge:
    """Prove the join token to a node that sent a well-formed nonce; else offer nothing."""
    nonce_n = ws.headers.get(NONCE_HEADER, "")
    if not valid_nonce(nonce_n) or not valid_node_name(node):
        return Challenge()
    found, host = ws.headers.get(FOUND_HEADER, ""), ws.headers.get("host", "")
    if found == "mdns" and not _advertised(ws, host):
        conns = getattr(ws.app.state, "connections", None)  # once per 10 s per node
        warn = conns.refusals.warning if conns is not None else _warning
        warn(f"relay:{node}", "node %s says it found this coordinator by mDNS but dialed %r, "
             "which is not advertised here: relayed? no proof given", node, host[:100],
             extra={"node": node})
        return Challenge()
    bound = binding(found, host)
    nonce_c, value = ids.prove(node, nonce_n, bound)
    return Challenge(nonce_n, nonce_c, bound, [(PROOF_HEADER.lower().encode(), value.encode())])


def join_refusal(ids: NodeIdentities, node: str, reg: Register, ch: Challenge | None) -> str:
    """Why `reg` may not join ("" if it may): a proof for this connection's exchange, or else
    the join token itself (older clients, explicit URLs to older coordinators)."""
    if reg.proof:
        if ch is None or not ch.nonce_c:
            return "bad join-token proof: no nonce was exchanged in the handshake"
        if ids.node_proof_ok(node, ch.nonce_n, ch.nonce_c, ch.bound, reg.proof):
            return ""
        return "bad join-token proof: not this mesh's join token"
    return "" if ids.join_ok(reg.token) else "bad token: not this mesh's join token"
