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

from shared.proof import NONCE_HEADER, PROOF_HEADER, Unproven, check_coordinator, new_nonce
from shared.proof import node_proof as _node_proof
from shared.protocol import Register

log = logging.getLogger(__name__)

TokenSource = Callable[[], Awaitable[str]]


class ProvingConnection(ClientConnection):
    """A client connection that asks the coordinator to prove the join token.

    `required`: refuse a coordinator that answers without a proof (discovered ones);
    otherwise such an answer (an older coordinator the user named) is let through and the
    node sends its token in `register` as it always did."""

    def __init__(
        self, *args: Any, token_source: TokenSource, node: str, required: bool, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._token_source, self.node, self.required = token_source, node, required
        self.token = self.nonce_n = self.nonce_c = ""

    async def handshake(
        self, additional_headers: HeadersLike | None = None,
        user_agent_header: str | None = USER_AGENT,
    ) -> None:
        self.token = await self._token_source()
        headers = Headers(additional_headers) if additional_headers is not None else Headers()
        if self.token:
            self.nonce_n = new_nonce()
            headers[NONCE_HEADER] = self.nonce_n
        elif self.required:
            raise Unproven("this node has no join token (MESH_TOKEN or MESH_TOKEN_FILE) to "
                           "check a coordinator's proof with")
        await super().handshake(headers, user_agent_header)
        if not self.nonce_n:
            return
        header = self.response.headers.get(PROOF_HEADER) if self.response else None
        if header is None and not self.required:
            log.info("%s did not prove it knows the join token (an older coordinator): "
                     "sending the token in register, as before", self.request.path
                     if self.request else "the coordinator")
            self.nonce_n = ""
            return
        self.nonce_c = check_coordinator(self.token, self.node, self.nonce_n, header)

    @property
    def proven(self) -> bool:
        return bool(self.nonce_c)


def proving(
    token_source: TokenSource, node: str, *, required: bool
) -> type[ClientConnection]:
    """For `connect(create_connection=...)`: each connection proves itself afresh."""

    def factory(*args: Any, **kwargs: Any) -> ProvingConnection:
        return ProvingConnection(
            *args, token_source=token_source, node=node, required=required, **kwargs
        )

    return cast(type[ClientConnection], factory)  # websockets only calls it


def signed(reg: Register, ws: object) -> Register:
    """`reg` with the node's proof in place of the join token, if `ws` was proven."""
    if isinstance(ws, ProvingConnection) and ws.proven:
        proof = _node_proof(ws.token, ws.node, ws.nonce_n, ws.nonce_c)
        return msgspec.structs.replace(reg, token="", proof=proof)
    return reg


__all__ = ["ProvingConnection", "Unproven", "proving", "signed"]
