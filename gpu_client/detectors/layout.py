"""One index space for a node's GPUs, and the way back to each vendor runtime's device ids.

A node with one GPU vendor (nearly every node) reports exactly the indices that vendor's
runtime uses: `index` 2 is CUDA/ROCr/Level Zero device 2. On a node with GPUs of more than
one vendor, each vendor's indices are shifted into its own block of VENDOR_BLOCK, in
VENDOR_ORDER: an RTX 4090 and a Radeon 7800 are indices 0 and 100, and index 100 is ROCr
device 0. So the vendor's own index is always `index % VENDOR_BLOCK`, and
`visible_devices_env` turns the GPUs a task was given into its environment.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import msgspec

from shared.protocol import GpuInfo

VENDOR_ORDER = ("nvidia", "amd", "intel", "apple")
VENDOR_BLOCK = 100


def lay_out(per_vendor: Iterable[tuple[str, Sequence[GpuInfo]]]) -> list[GpuInfo]:
    """Concatenate each vendor's GPUs (indices as the vendor numbers them) into one list."""
    groups: dict[str, list[GpuInfo]] = {}
    for vendor, gpus in per_vendor:
        if gpus:
            groups.setdefault(vendor, []).extend(gpus)
    if len(groups) <= 1:
        return [g for gpus in groups.values() for g in gpus]
    out: list[GpuInfo] = []
    for vendor in sorted(groups, key=_rank):
        base = VENDOR_BLOCK * _rank(vendor)
        for g in groups[vendor]:
            parent = None if g.parent_index is None else g.parent_index + base
            out.append(msgspec.structs.replace(g, index=g.index + base, parent_index=parent))
    return out


def _rank(vendor: str) -> int:
    return VENDOR_ORDER.index(vendor) if vendor in VENDOR_ORDER else len(VENDOR_ORDER)


def runtime_id(gpu: GpuInfo) -> str:
    """The id the vendor runtime takes for this GPU in its visibility variable.

    NVIDIA: the UUID (`GPU-...` or `MIG-...`), immune to CUDA's FASTEST_FIRST ordering and
    the only way to name a MIG instance. AMD: ROCr's `GPU-<hex>` UUID when known. Otherwise
    the vendor's own index.
    """
    if gpu.vendor == "nvidia" and gpu.uuid.startswith(("GPU-", "MIG-")):
        return gpu.uuid
    if gpu.vendor == "amd" and gpu.uuid.startswith("GPU-"):
        return gpu.uuid
    return str(gpu.index % VENDOR_BLOCK)


_VISIBILITY_VAR = {
    "nvidia": "CUDA_VISIBLE_DEVICES",
    "fake": "CUDA_VISIBLE_DEVICES",
    "amd": "ROCR_VISIBLE_DEVICES",
    "intel": "ZE_AFFINITY_MASK",
}


def visible_devices_env(gpus: Sequence[GpuInfo]) -> dict[str, str]:
    """The environment that shows a task exactly `gpus` (what the task was assigned).

    Apple GPUs have no such variable and add nothing.
    """
    env: dict[str, str] = {}
    for g in gpus:
        var = _VISIBILITY_VAR.get(g.vendor)
        if var is None:
            continue
        ids = runtime_id(g)
        env[var] = f"{env[var]},{ids}" if var in env else ids
    if "CUDA_VISIBLE_DEVICES" in env:
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # numbering inside the task follows NVML's
    return env
