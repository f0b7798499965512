"""Scheduling: which task runs next, and where. Pure parts, no I/O and no clock of their own.

Owns: placement (`placement`: requirements and node snapshots in, a decision or a
counted reason out), the queue of requirement classes (`queue`), the queue across tenants
(`fairqueue`) with its pure fair-share arithmetic (`fairshare`), tenants' quotas, rate
limits and usage (`tenants`), and the wake-up keys that say which queued classes a freed
resource can help (`wake`).

May import: `coordinator.model`, `coordinator.settings` and `shared`. Nothing else in
the coordinator: the Mesh (core) calls scheduling and hands it what it needs.
"""
