"""The core: the Mesh, the one object that changes task and node state.

Owns: the task lifecycle and its transition table (`mesh`), what nodes report and how
the Mesh answers it (`node_side`, `nodes`), infrastructure faults and quarantine
(`faults`), node drains (`drain`), preemption plans (`preempt`), the cross-checks run
after each change in tests (`invariants`), task log buffers (`logs`) and the Prometheus
series the Mesh exposes (`metrics`).

May import: `coordinator.scheduling`, `coordinator.storage`, `coordinator.model`,
`coordinator.settings` and `shared`. Never the web face, the node link, access or
leadership: they call the Mesh, not the other way round.
"""
