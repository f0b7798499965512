"""What the coordinator and the compute client both import: protocol, task spec, config."""

__version__ = "0.1.0"
