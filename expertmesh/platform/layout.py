"""The mesh's layout (context shards, expert groups, colocation) picked from the hardware where
the caller names none.

On GPUs: one colocated worker (context shard i + expert group i) per GPU, as vLLM and SGLang run
one rank per accelerator. On CPUs: one colocated worker per `CPUS_PER_WORKER` cores, at least one,
so the router and the workers do not oversubscribe the cores (on a 2-core host: the router and one
worker; `benchmarks/bench_user_path.py` measures this against 4 shards + 2 groups and the other
layouts). A caller naming a count gets separate shard and group actors unless it asks to colocate;
counts it leaves out come from the same rule.
"""

from __future__ import annotations

import dataclasses
import os

from expertmesh.actors.names import CONTEXT_SHARD, EXPERT_GROUP

CPUS_PER_WORKER = 4


@dataclasses.dataclass(frozen=True)
class Layout:
    context_shards: int
    expert_groups: int
    colocate: bool
    why: str  # how the layout was picked, for logs and errors


def local_resources(cpu_only: bool = False) -> dict[str, float]:
    """What a local Ray cluster started here would report: this host's CPUs and GPUs (cpu_only:
    GPUs not counted, the mesh will not use them)."""
    return {"CPU": float(os.cpu_count() or 1), "GPU": 0.0 if cpu_only else float(_cuda_devices())}


def _cuda_devices() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no usable CUDA: a CPU host
        return 0


def pick_layout(context_shards: int | None, expert_groups: int | None, colocate: bool | None,
                resources: dict[str, float], num_experts: int = 0) -> Layout:
    """The layout for these arguments (None: picked) on a cluster with these resources (Ray's
    `cluster_resources()`, or `local_resources()` before a local cluster starts)."""
    for what, n in (("context_shards", context_shards), ("expert_groups", expert_groups)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"{what} must be an integer >= 1 or None (picked from the hardware), got {n!r}")
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    if gpus >= 1:
        n, why = gpus, f"one colocated worker per GPU ({gpus} GPUs)"
    else:
        n = max(1, cpus // CPUS_PER_WORKER)
        why = f"one colocated worker per {CPUS_PER_WORKER} CPUs, at least one ({cpus} CPUs, no GPU)"
    if num_experts:
        n = min(n, num_experts)
    declared = [int(resources[k]) for k in (CONTEXT_SHARD, EXPERT_GROUP) if k in resources]
    if declared and min(declared) >= 1:  # a colocated worker takes one unit of each
        n = min(n, *declared)
    if colocate is None:
        colocate = context_shards is None and expert_groups is None
        if not colocate:
            why = "separate shard and group actors (counts given)"
    return Layout(context_shards or n, expert_groups or n, bool(colocate), why)
