"""The node's half of the join-token proof (the protocol is in shared/proof.py).

`proving(...)` gives `websockets.connect` a connection class whose opening handshake sends a
fresh nonce and checks the coordinator's proof in the 101 answer before anything else is
sent; `signed(register, ws)` then puts the node's own proof in `register` in place of the
join token. A coordinator that fails the check raises `Unproven` out of `connect`, its
socket aborted: it has received the node's name and a nonce, nothing more.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

import msgspec
from websockets.asyncio.client import ClientConnection
from websockets.datastructures import Headers, HeadersLike
from websockets.http11 import USER_AGENT

from shared.proof import (
    FOUND_HEADER,
    NONCE_HEADER,
    PROOF_HEADER,
    Unproven,
    binding,
    check_coordinator,
    new_nonce,
)
from shared.proof import node_proof as _node_proof
from shared.protocol import Register

log = logging.getLogger(__name__)

TokenSource = Callable[[], Awaitable[str]]


class ProvingConnection(ClientConnection):
    """A client connection that asks the coordinator to prove the join token.

    `discovered`: the address came from mDNS. Then a coordinator that answers without a
    proof is refused, and the proof is bound to the Host dialed (a relay elsewhere cannot
    pass one on). Otherwise (a URL the user named) such an answer, from an older
    coordinator, is let through and the node sends its token in `register` as before."""

    def __init__(
        self, *args: Any, token_source: TokenSource, node: str, discovered: bool, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._token_source, self.node, self.discovered = token_source, node, discovered
        self.token = self.nonce_n = self.nonce_c = self.bound = ""

    async def handshake(
        self, additional_headers: HeadersLike | None = None,
        user_agent_header: str | None = USER_AGENT,
    ) -> None:
        self.token = await self._token_source()
        headers = Headers(additional_headers) if additional_headers is not None else Headers()
        found = "mdns" if self.discovered else "url"
        if self.token:
            self.nonce_n = new_nonce()
            headers[NONCE_HEADER] = self.nonce_n
            if self.discovered:
                headers[FOUND_HEADER] = found
        elif self.discovered:
            raise Unproven("this node has no join token (MESH_TOKEN or MESH_TOKEN_FILE) to "
                           "check a coordinator's proof with")
        await super().handshake(headers, user_agent_header)
        if not self.nonce_n:
            return
        assert self.request is not None and self.response is not None
        header = self.response.headers.get(PROOF_HEADER)
        if header is None and not self.discovered:
            log.info("%s did not prove it knows the join token (an older coordinator): "
                     "sending the token in register, as before", self.request.path)
            self.nonce_n = ""
            return
        self.bound = binding(found, self.request.headers.get("Host", ""))
        self.nonce_c = check_coordinator(self.token, self.node, self.nonce_n, self.bound,
                                         header)

    @property
    def proven(self) -> bool:
        return bool(self.nonce_c)


def proving(
    token_source: TokenSource, node: str, *, discovered: bool
) -> type[ClientConnection]:
    """For `connect(create_connection=...)`: each connection proves itself afresh."""

    def factory(*args: Any, **kwargs: Any) -> ProvingConnection:
        return ProvingConnection(
            *args, token_source=token_source, node=node, discovered=discovered, **kwargs
        )

    return cast(type[ClientConnection], factory)  # websockets only calls it


def signed(reg: Register, ws: object) -> Register:
    """`reg` with the node's proof in place of the join token, if `ws` was proven."""
    if isinstance(ws, ProvingConnection) and ws.proven:
        proof = _node_proof(ws.token, ws.node, ws.nonce_n, ws.nonce_c, ws.bound)
        return msgspec.structs.replace(reg, token="", proof=proof)
    return reg


__all__ = ["ProvingConnection", "Unproven", "proving", "signed"]
