"""Mutual proof of the join token, during the WebSocket handshake, before any work flows.

A node that found its coordinator by multicast DNS has no reason to trust whoever answered:
anyone on the network can advertise `_gpumesh._tcp`. So both ends prove they know the join
token, without sending it:

1. The node opens `GET /ws/{node}` with a fresh random nonce in `X-Gpumesh-Nonce`, and
   `X-Gpumesh-Found: mdns` if it discovered the address (nothing else of its own: no GPUs,
   no token, no credential).
2. The coordinator draws its own nonce and answers the upgrade (101) with
   `X-Gpumesh-Proof: v1.<nonce_c>.<mac>`, `mac = HMAC-SHA256(join_token,
   "gpumesh-join-proof-v1" | "coordinator" | node | nonce_n | nonce_c | binding)`,
   base64url, where the binding is `"mdns <Host>"` with the `Host` the node dialed when it
   discovered the address (`"mdns 10.0.0.5:8001"`), else `"url"`.
3. The node checks that `mac` (constant time) against the Host it dialed before it sends
   anything. A coordinator without the token cannot compute it for a nonce it has never
   seen: the node closes the socket, logs why, and tries the next candidate. A rogue gets
   the node's name and a random nonce, nothing else.
4. The node's `register` then carries `proof = HMAC(join_token, ... "node" | node | nonce_n |
   nonce_c | binding)` and an empty `token`: the join token itself never crosses the wire.
   The coordinator checks it for this connection (constant time) and refuses a wrong one
   with 1008, exactly like a wrong token.

The role label keeps one side's answer from being replayed as the other's; the node name
binds a proof to the `/ws/{node}` it was made for; fresh nonces on both sides keep a
recorded exchange from being replayed on another connection. The binding stops a relay: a
rogue that advertises itself and forwards the node's handshake to the real coordinator.
If it forwards the node's `Host` (its own address), the coordinator proves nothing, since a
node that found it by mDNS must have dialed an address it advertises; if it dials the real
address, the proof is bound to that address, not to the one the node dialed, and the node
refuses it. Stripping `X-Gpumesh-Found` changes the binding the same way.

Where it applies: a discovered coordinator must prove itself (no proof header: refused).
With an explicit `MESH_COORDINATOR_URL` the proof is offered: a coordinator that answers
with a proof is checked (a wrong one is fatal, like a wrong token), one that answers
without (an older coordinator) gets the token in `register` as before, since the user
named it; the address is not checked there (proxies and NAT are legitimate). Older nodes
send no nonce and a `token` in `register`, which is still accepted. The credential a node
holds proves its name; it is sent only after the coordinator proved the mesh. What this
does not do: an attacker who takes over the coordinator's own address (ARP or DNS
spoofing) on an unencrypted `ws://` link can still sit in the middle. Against that, use
`wss://` with a certificate the node verifies (`MESH_CA_FILE`): the certificate is the
proof of the endpoint, the HMAC the proof of the mesh.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

NONCE_HEADER = "X-Gpumesh-Nonce"
FOUND_HEADER = "X-Gpumesh-Found"  # "mdns": the node dialed an address it discovered
PROOF_HEADER = "X-Gpumesh-Proof"
VERSION = "v1"
_LABEL = b"gpumesh-join-proof-v1"
_NONCE_RE = re.compile(r"[A-Za-z0-9_-]{16,64}")


def new_nonce() -> str:
    """32 URL-safe characters (192 random bits)."""
    return secrets.token_urlsafe(24)


def valid_nonce(nonce: str) -> bool:
    return _NONCE_RE.fullmatch(nonce) is not None


def binding(found: str, host: str) -> str:
    """What a proof is bound to besides the nonces: "mdns <Host it dialed>" for a discovered
    coordinator; "url" for a named one (a reverse proxy may rewrite its Host)."""
    return f"mdns {host.strip().lower()}" if found == "mdns" else "url"


def mac(token: str, role: str, node: str, nonce_n: str, nonce_c: str, bound: str) -> str:
    """HMAC-SHA256 keyed by the join token over the role, node name, both nonces and the
    binding (base64url, no padding)."""
    msg = b"\0".join(
        part.encode("utf-8", "surrogatepass") for part in (role, node, nonce_n, nonce_c, bound)
    )
    digest = hmac.new(token.encode("utf-8", "surrogatepass"), _LABEL + b"\0" + msg,
                      hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def same(given: str, expected: str) -> bool:
    """Constant-time comparison of two proofs as bytes: any text, never an exception."""
    return hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )


def coordinator_header(token: str, node: str, nonce_n: str, bound: str) -> tuple[str, str]:
    """The coordinator's answer to a node's nonce: (its own nonce, the header value)."""
    nonce_c = new_nonce()
    proof = mac(token, "coordinator", node, nonce_n, nonce_c, bound)
    return nonce_c, f"{VERSION}.{nonce_c}.{proof}"


def check_coordinator(
    token: str, node: str, nonce_n: str, bound: str, header: str | None
) -> str:
    """The coordinator's nonce if `header` proves the join token for `nonce_n` and
    `bound`; raises Unproven with the reason otherwise (absent, malformed, wrong)."""
    if header is None:
        raise Unproven("it sent no join-token proof (an impostor, a relay, or a coordinator "
                       "too old to prove itself)")
    parts = header.strip().split(".")
    if len(parts) != 3 or parts[0] != VERSION or not valid_nonce(parts[1]):
        raise Unproven(f"its {PROOF_HEADER} header is malformed")
    nonce_c, given = parts[1], parts[2]
    if not same(given, mac(token, "coordinator", node, nonce_n, nonce_c, bound)):
        raise Unproven("its join-token proof is wrong: it does not know this mesh's join "
                       "token, or it relays another coordinator's answer")
    return nonce_c


def node_proof(token: str, node: str, nonce_n: str, nonce_c: str, bound: str) -> str:
    return mac(token, "node", node, nonce_n, nonce_c, bound)


def node_proof_ok(
    token: str, node: str, nonce_n: str, nonce_c: str, bound: str, given: str
) -> bool:
    return same(given, node_proof(token, node, nonce_n, nonce_c, bound))


class Unproven(Exception):
    """A coordinator that did not prove it knows the join token; `reason` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"coordinator refused: {reason}")
        self.reason = reason
