"""The coordinator's half of the join-token proof (the protocol is in shared/proof.py).

A node that sends a nonce in `X-Gpumesh-Nonce` gets the coordinator's proof in the 101
answer; its `register` must then carry the node's proof for the same two nonces. A node
that sends no nonce (an older client, or one told the URL) is checked by the `token` in its
`register`, as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.websockets import WebSocket

from coordinator.identity import NodeIdentities
from shared.proof import NONCE_HEADER, PROOF_HEADER, valid_nonce
from shared.protocol import Register, valid_node_name


@dataclass(frozen=True, slots=True)
class Challenge:
    """This connection's two nonces ("" when the node offered none) and the 101's headers."""

    nonce_n: str = ""
    nonce_c: str = ""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


def answer(ws: WebSocket, ids: NodeIdentities, node: str) -> Challenge:
    """Prove the join token to a node that sent a well-formed nonce; else offer nothing."""
    nonce_n = ws.headers.get(NONCE_HEADER, "")
    if not valid_nonce(nonce_n) or not valid_node_name(node):
        return Challenge()
    nonce_c, value = ids.prove(node, nonce_n)
    return Challenge(nonce_n, nonce_c, [(PROOF_HEADER.lower().encode(), value.encode())])


def join_refusal(ids: NodeIdentities, node: str, reg: Register, ch: Challenge | None) -> str:
    """Why `reg` may not join ("" if it may): a proof for this connection's nonces, or else
    the join token itself (older clients, explicit URLs to older coordinators)."""
    if reg.proof:
        if ch is None or not ch.nonce_c:
            return "bad join-token proof: no nonce was exchanged in the handshake"
        if ids.node_proof_ok(node, ch.nonce_n, ch.nonce_c, reg.proof):
            return ""
        return "bad join-token proof: not this mesh's join token"
    return "" if ids.join_ok(reg.token) else "bad token: not this mesh's join token"
