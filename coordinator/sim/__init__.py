"""The simulator: replays a trace of jobs through the real scheduling code on a virtual clock.

Owns: the engine (`engine`: simulated nodes, a virtual clock, the live coordinator's dispatch
pass and policies, coordinator/core/dispatch.py and coordinator/scheduling/), the trace
readers and the reports built on it.

May import: `coordinator.core`, `coordinator.scheduling`, `coordinator.storage`,
`coordinator.model`, `coordinator.settings` and `shared`. No sockets, no sleeping, no store
I/O: nothing here touches a live mesh. The web face, the node link, access and leadership
never import it.
"""
