"""A context shard's memory: the host's (or its container's), the hot-page budget a shard takes
when none is given, and the scratch directories of shards whose process is gone."""

from __future__ import annotations

import os
import shutil
import tempfile

import torch


def host_memory_bytes() -> int:
    """This host's memory, or the container's limit where one is set (cgroup v2 / v1)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def default_pool_bytes(device: torch.device, gpu_share: float | None = None) -> int:
    """The hot-page budget when none is given. A pool in host memory: an eighth of the host's
    (or container's) memory. A pool on a GPU: 90% of the GPU memory free when the pool is made
    (after the weights of actors sharing the GPU loaded), at most this actor's share of the GPU
    (`gpu_share`: the GPUs it asked Ray for; several shards and expert groups may share one)."""
    if device.type != "cuda":
        return host_memory_bytes() // 8
    free, total = torch.cuda.mem_get_info(device)
    share = total * min(1.0, gpu_share) if gpu_share else total
    return int(0.9 * min(free, share))


def remove_dead_scratch() -> None:
    """Scratch directories of shards whose process is gone (killed: no exit handler ran)."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        parts = name.split("-")
        if len(parts) >= 3 and parts[0] == "expertmesh" and parts[1].startswith("shard") and parts[2].isdigit():
            try:
                os.kill(int(parts[2]), 0)
            except ProcessLookupError:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            except PermissionError:
                pass
