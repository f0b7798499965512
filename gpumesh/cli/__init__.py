"""The `gpumesh` command: one module per group of subcommands, `main` wires them together.

Owns: argument parsing, tables and `--json` output (`common`), tasks, nodes, tenants,
tokens, `detect`, `discover` and `up`. Every call to a coordinator goes through
`gpumesh.sdk`; `detect` imports `gpu_client.detect`, `discover` the mDNS browser of
`gpu_client.discover`, and `up` starts `python -m coordinator` and `python -m gpu_client`
as processes.
"""
