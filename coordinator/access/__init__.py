"""Access: who a caller is, what its role lets it do, and the record of what it did.

Owns: bearer tokens, roles (admin, submit, metrics, read) and tenants of callers (`auth`), and the
audit trail written in the same transaction as the change it records (`audit`).

May import: `coordinator.storage`, `coordinator.model` and `shared`. The web face and the
node link import it; it imports neither of them, nor the core.
"""
