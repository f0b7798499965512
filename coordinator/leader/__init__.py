"""Leadership: which coordinator of a mesh leads, and how the others and the nodes find it.

Owns: the lease in the shared PostgreSQL store (`lease`), standbys that forward the API to
the leader and point nodes at it (`standby`), and the mDNS advertisement of the
coordinator for zero-configuration join (`advertise`).

May import: `coordinator.storage`, `coordinator.model`, `coordinator.settings` and
`shared`. Whatever it needs from the web face is passed in by `coordinator.web.app`.
"""
