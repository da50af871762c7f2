"""What a mesh is, as one typed value: `MeshSpec`, validated once at construction with the
numbers in its messages (as torchtitan's job config or Ray Serve LLM's `LLMConfig`).

`Mesh.start` builds one from its keywords (or takes one whole), the CLI and `ServeSettings`
(so the Helm chart's values) fill one, and the router actor receives it whole. How and where a
mesh is launched (the Ray address, a name, detached, the start timeout) are `Mesh.start`'s own
arguments, not part of the spec.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from expertmesh.engine.exchange import check_data_plane, check_transport
from expertmesh.jax_backend import check_backend
from expertmesh.model.device import check_device_dtype
from expertmesh.store.pages import KV_DTYPES


def _count(what: str, value: Any, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1{' or None' if none_ok else ''}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """A mesh's deployment.

    checkpoint: a Hugging Face model directory or URI (s3://, gs://, file://); None: the
    built-in model.
    context_shards, expert_groups, colocate: the layout; None picks it from the hardware
    (platform/layout.py): with no count given, one colocated worker per GPU, or per 4 CPUs on
    CPU hosts; counts given: separate actors unless colocate=True. colocate: one actor per index
    holds context shard i and expert group i (how attention and experts share an accelerator).
    routers: router actors (each its own batch and data-plane group with every shard and expert
    group; calls go to the least busy, a router that dies under a call fails over to another).
    store: a directory or URI holding the contexts' KV pages and manifests: contexts survive
    restarts and may be larger than memory. None: each shard keeps its pages in a scratch
    directory of its host, lost with the shard.
    shard_capacity_tokens: a cap on the tokens each shard holds (None: bounded by the store).
    shard_memory_bytes: each shard's budget of hot pages in memory (None: an eighth of its
    host's memory; on a GPU, 90% of what is free of the shard's share of its GPU).
    page_size: tokens per KV page; kv_dtype: "float32" or "bfloat16", how pages are stored.
    max_batch_tokens: tokens a router step takes at most (registration runs in pieces this long).
    lanes: router step loops overlapping one batch's compute with another's remote calls (the
    "ray" data plane; the collective one runs one step at a time).
    micro_batches: 1, or 2: a router step runs its requests as two halves in ping-pong (one
    computes its dense layers while the other's rows are at the shards and expert groups;
    engine/ping_pong.py); the same logits either way.
    whole_steps: where one colocated worker holds every context shard and expert group (the
    default layout on one host), the router sends it each step whole: it computes every layer
    in process, one round trip a step instead of two a layer (engine/whole_step.py); False: per
    layer. The same logits either way.
    data_plane: "collective" (per-layer tensors point to point; `transport` "auto": NCCL when
    the router computes on a GPU, TCP sockets on CPU hosts; "gloo" or "socket" forced) or "ray"
    (a Ray task per actor per layer, the reference path; same results).
    shard_backend / expert_backend: "torch" or "jax".
    device: "auto", "cpu", "cuda" or "cuda:N"; dtype: "auto" (bfloat16 on GPUs, float32 on
    CPUs), "float32", "bfloat16" or "float16".
    gpus_per_actor: GPUs each actor asks Ray for (None: the cluster's GPUs shared evenly by the
    mesh's actors, router included).
    """

    checkpoint: str | None = None
    context_shards: int | None = None
    expert_groups: int | None = None
    colocate: bool | None = None
    routers: int = 1
    store: str | None = None
    shard_capacity_tokens: int | None = None
    shard_memory_bytes: int | None = None
    page_size: int = 64
    kv_dtype: str = "float32"
    max_batch_tokens: int = 16384
    lanes: int = 2
    micro_batches: int = 1
    whole_steps: bool = True
    data_plane: str = "collective"
    transport: str = "auto"
    shard_backend: str = "torch"
    expert_backend: str = "torch"
    device: str = "auto"
    dtype: str = "auto"
    gpus_per_actor: float | None = None

    def __post_init__(self) -> None:
        for what in ("context_shards", "expert_groups", "shard_capacity_tokens", "shard_memory_bytes"):
            _count(what, getattr(self, what), none_ok=True)
        for what in ("routers", "page_size", "max_batch_tokens", "lanes"):
            _count(what, getattr(self, what))
        if self.micro_batches not in (1, 2) or isinstance(self.micro_batches, bool):
            raise ValueError(f"micro_batches must be 1 or 2, got {self.micro_batches!r}")
        if not isinstance(self.whole_steps, bool):
            raise ValueError(f"whole_steps must be True or False, got {self.whole_steps!r}")
        if self.colocate is not None and not isinstance(self.colocate, bool):
            raise ValueError(f"colocate must be True, False or None (picked), got {self.colocate!r}")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {self.kv_dtype!r}")
        check_data_plane(self.data_plane)
        check_transport(self.transport)
        device, dtype = check_device_dtype(self.device, self.dtype)
        if self.transport == "nccl" and device == "cpu":
            raise ValueError("transport 'nccl' does not fit device 'cpu' (NCCL moves GPU tensors; 'socket' and "
                             "'gloo' host tensors)")
        g = self.gpus_per_actor
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float))
                              or not (0 < g <= 1 or g == int(g) > 0)):
            raise ValueError(f"gpus_per_actor must be in (0, 1] or a whole number, got {g}")
        check_backend("shard_backend", self.shard_backend)
        check_backend("expert_backend", self.expert_backend)
        for key, value in (("device", device), ("dtype", dtype),
                           ("store", None if self.store is None else str(self.store)),
                           ("checkpoint", None if self.checkpoint is None else str(self.checkpoint))):
            object.__setattr__(self, key, value)  # normalised once ("cuda:0" forms, paths as str)

    def replace(self, **changes: Any) -> "MeshSpec":
        """A copy with these fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
