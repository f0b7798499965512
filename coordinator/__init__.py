"""The lead node: HTTP and WebSocket server, registry, queue, placement and store."""
