"""gpumesh for its users: the Python SDK, the `gpumesh` command and `gpumesh up`.

    from gpumesh import Client

    with Client() as mesh:                       # MESH_URL / MESH_API_TOKEN, or ./mesh-data
        print(mesh.wait(mesh.submit(task_type="test").task_id).status)

Owns: the SDK (`sdk`, with its pure request plans in `sdk_calls` and answer types in
`sdk_types`) and the CLI (`cli/`). It is an API client: it reaches a coordinator only over
HTTP, through the SDK. It may import `shared/` (the wire vocabulary) and, for
`gpumesh detect`, `gpu_client.detect`; it never imports the coordinator's wings except
`coordinator.storage.datadir`, which `gpumesh up` reads to refuse a data dir a running
coordinator holds.
"""

from gpumesh.sdk import AsyncClient, Client, default_token, default_url, token_file
from gpumesh.sdk_types import (
    DrainState,
    MeshError,
    MeshStatus,
    MeshUnreachable,
    NodeInfo,
    Submitted,
    TaskInfo,
    TaskPage,
)

__all__ = [
    "AsyncClient",
    "Client",
    "DrainState",
    "MeshError",
    "MeshStatus",
    "MeshUnreachable",
    "NodeInfo",
    "Submitted",
    "TaskInfo",
    "TaskPage",
    "default_token",
    "default_url",
    "token_file",
]
