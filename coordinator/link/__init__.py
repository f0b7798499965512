"""The node link: the WebSocket every compute node keeps open to the coordinator.

Owns: the socket handler that decodes frames, calls the Mesh and sends what it returns
(`ws`), node identities (join token, issued credentials, `identity`) and the join-token
proof a node shows before its first frame (`join_proof`).

May import: `coordinator.core`, `coordinator.access`, `coordinator.storage`,
`coordinator.model`, `coordinator.settings` and `shared`. Never the web face.
"""
