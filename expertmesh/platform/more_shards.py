"""Starting context shards for a running mesh (`Mesh.add_shards`): made like its running shards."""

from __future__ import annotations

import ray

from expertmesh.actors.context_shard import RemoteContextShard
from expertmesh.actors.names import mesh_of
from expertmesh.dataplane.liveness import actor_row
from expertmesh.errors import PlacementError, Unavailable
from expertmesh.platform.cluster import (
    CONTEXT_SHARD,
    NAMESPACE,
    actor_name,
    actor_options,
)


def start_shards(router, shards: list, n: int, timeout_s: float, first: int) -> list[tuple[str, object]]:
    """n shards with indices from `first` on (never one a shard taken out had), the same constructor arguments as a running shard's (its
    backend, page budget, store, GPU share) and the mesh's lifetime; (name, handle) each, once
    every one answers. Fails within timeout_s (PlacementError: no room) leaving nothing behind."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    backend, args = _spec(shards)
    cls = RemoteContextShard
    if backend == "jax":
        from expertmesh.actors.jax_context_shard import RemoteJaxContextShard as cls
    row = actor_row(router)
    base, gpu_share = mesh_of(row["Name"]), args[-1]
    life = ({"lifetime": "detached"} if row.get("IsDetached") else {}) | ({"num_gpus": gpu_share} if gpu_share else {})
    names = [actor_name(base, CONTEXT_SHARD, i) for i in range(first, first + n)]
    new = []
    try:
        for i, name in zip(range(first, first + n), names):
            opts = actor_options(CONTEXT_SHARD) | life | {"name": name, "namespace": NAMESPACE}
            new.append(cls.options(**opts).remote(i, *args[1:]))
        ready, pending = ray.wait([s.ping.remote() for s in new], num_returns=n, timeout=timeout_s)
        ray.get(ready)  # a constructor's error
        if pending:
            free, total = ray.available_resources(), ray.cluster_resources()
            raise PlacementError(f"cannot add {n} context shard(s): {len(pending)} did not start within "
                                 f"{timeout_s:g} s; the cluster has {free.get(CONTEXT_SHARD, 0):g} `{CONTEXT_SHARD}` "
                                 f"free of {total.get(CONTEXT_SHARD, 0):g}")
    except BaseException:
        for actor in new:
            ray.kill(actor)
        raise
    return list(zip(names, new))


def _spec(shards: list) -> tuple[str, tuple]:
    """(backend, constructor arguments) of the first running shard that answers."""
    for shard in shards:
        try:
            return ray.get(shard.spec.remote(), timeout=10)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            continue
    raise Unavailable("cannot add context shards: none of the mesh's shards answers to say how it was made")


def is_detached(router) -> bool:
    """Was the mesh started detached (its actors outlive the driver that started them)?"""
    return bool(actor_row(router).get("IsDetached"))

