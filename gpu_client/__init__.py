"""The compute node: GPU detection, telemetry, executors and the connection loop."""
