"""The store: the durable truth the Mesh's memory is a cache of.

Owns: the Store interface and its SQLite engine with one writer thread and group commit
(`store`), the writes and rows both engines share (`store_core`), the PostgreSQL engine
with its lease-fenced writes (`store_pg`), schema migrations for both (`schema`), API
tokens and tenants at rest (`authstore`), and the data-dir lock that keeps a second
coordinator off a data dir (`datadir`).

May import: `coordinator.model`, `coordinator.settings` and `shared`. Nothing above it.
"""
