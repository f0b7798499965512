"""The lead node: HTTP and WebSocket server, registry, queue, placement and store.

The coordinator is built in wings, one concept each; imports run one way, top to bottom:

    web                  the HTTP face and the app (imports any wing below)
    leader, link         leadership / the node WebSocket
    access               callers' tokens, roles and the audit trail
    core                 the Mesh: the one object that changes state
    scheduling, storage  queue and placement / the durable store
    model, settings      the vocabulary every wing shares (imports only `shared`)

Each wing's `__init__` says what it owns and what it may import; a test
(tests/test_layers.py) fails on an import circle or an import that runs upward.
docs/architecture.md is the tour.
"""
