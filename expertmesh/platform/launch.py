"""Starting a mesh's actors (`Mesh.start`): the layout picked for the cluster, the context
shards, expert groups (or colocated workers) and routers as named Ray actors, every one
answering before this returns; a failed start kills what it started."""

from __future__ import annotations

import uuid

import ray

from expertmesh.actors.context_shard import ContextShard, RemoteContextShard
from expertmesh.actors.expert_group import RemoteExpertGroup
from expertmesh.actors.router.router import RemoteRouter
from expertmesh.actors.worker import remote_worker
from expertmesh.errors import PlacementError
from expertmesh.mesh_spec import MeshSpec
from expertmesh.model.config import ModelConfig
from expertmesh.model.moe import expert_partition
from expertmesh.platform.cluster import (
    CONTEXT_SHARD,
    EXPERT_GROUP,
    NAMESPACE,
    WORKER,
    actor_name,
    actor_options,
    connect,
    describe_resources,
    gpus_per_mesh_actor,
    missing_resources,
    threads_per_actor,
)
from expertmesh.platform.layout import local_resources, pick_layout


def launch(spec: MeshSpec, path, config: ModelConfig, fingerprint: str | None, address: str | None,
           name: str | None, detached: bool, start_timeout_s: float) -> tuple[list, list, list, bool]:
    """(routers, shards, groups, whether this call started Ray) of a new mesh."""
    device, store = spec.device, spec.store
    experts = config.num_experts if any(config.moe_layers) else 0
    local = address is None and not ray.is_initialized()
    cpu_only = device == "cpu"  # a GPU host's GPUs do not count then
    layout = pick_layout(spec.context_shards, spec.expert_groups, spec.colocate,
                         local_resources(cpu_only) if local else {}, experts)
    started = connect(address, layout.context_shards, layout.expert_groups)
    actors: list = []
    try:
        if not local:  # a running cluster: its own resources decide what is left to pick
            have = {k: v for k, v in ray.cluster_resources().items() if not (cpu_only and k == "GPU")}
            layout = pick_layout(spec.context_shards, spec.expert_groups, spec.colocate, have, experts)
        context_shards, colocate = layout.context_shards, layout.colocate
        partition = expert_partition(config.num_experts, layout.expert_groups) if experts else []
        missing = missing_resources(context_shards, len(partition))
        if missing:
            raise PlacementError(f"cannot start the mesh: {missing}")
        n_actors = (max(context_shards, len(partition)) if colocate else context_shards + len(partition)) \
            + spec.routers
        threads = threads_per_actor(n_actors)
        gpus = gpus_per_mesh_actor(device, spec.gpus_per_actor, n_actors)
        specs = [config.attention_spec(i) for i in range(config.num_layers)]
        base = name or f"mesh-{uuid.uuid4().hex[:12]}"
        life = {"lifetime": "detached"} if detached else {}

        life |= {"num_gpus": gpus} if gpus else {}

        def options(kind: str | None, index: int = 0) -> dict:
            return actor_options(kind) | life | {"name": actor_name(base, kind, index), "namespace": NAMESPACE}

        shard_cls, shard_plain = RemoteContextShard, ContextShard
        if spec.shard_backend == "jax":  # imports JAX in the shard actors only
            from expertmesh.actors.jax_context_shard import (
                JaxContextShard as shard_plain,
            )
            from expertmesh.actors.jax_context_shard import (
                RemoteJaxContextShard as shard_cls,
            )
        shard_args = [(i, specs, spec.shard_capacity_tokens, spec.page_size, threads, store,
                       spec.shard_memory_bytes, spec.kv_dtype, device, gpus or None)
                      for i in range(max(context_shards, len(partition)))]
        group_args = [(str(path), g, experts, threads, spec.expert_backend, device, spec.dtype)
                      for g, experts in enumerate(partition)]
        if colocate:  # worker i: shard i and group i (a worker past the last shard only computes experts)
            worker_cls = remote_worker(shard_plain)
            n = max(context_shards, len(partition))
            names = [actor_name(base, WORKER, i) for i in range(n)]
            for i in range(n):
                opts = actor_options(CONTEXT_SHARD if i < context_shards else EXPERT_GROUP,
                                     also=EXPERT_GROUP if i < min(context_shards, len(partition)) else None)
                actors.append(worker_cls.options(**opts | life | {"name": names[i], "namespace": NAMESPACE})
                              .remote(shard_args[i], group_args[i] if i < len(partition) else None))
            shards, groups = actors[:context_shards], actors[:len(partition)]
            shard_names, group_names = names[:context_shards], names[:len(partition)]
        else:
            shards = [shard_cls.options(**options(CONTEXT_SHARD, i)).remote(*shard_args[i])
                      for i in range(context_shards)]
            groups = [RemoteExpertGroup.options(**options(EXPERT_GROUP, g)).remote(*a)
                      for g, a in enumerate(group_args)]
            actors += shards + groups
            shard_names = [actor_name(base, CONTEXT_SHARD, i) for i in range(len(shards))]
            group_names = [actor_name(base, EXPERT_GROUP, g) for g in range(len(groups))]
        placed = spec.replace(checkpoint=str(path), context_shards=context_shards,  # what was picked
                              expert_groups=layout.expert_groups, colocate=colocate)
        routers_ = [RemoteRouter.options(**options(None, r)).remote(placed, shard_names, group_names, fingerprint)
                    for r in range(spec.routers)]
        actors += routers_
        _await_pings(routers_, shards, groups, start_timeout_s)
    except BaseException as exc:
        for actor in actors:  # a failed start leaves nothing behind
            ray.kill(actor)
        if started:
            ray.shutdown()
        if isinstance(exc, ray.exceptions.RayActorError) and "expertmesh[jax]" in str(exc):
            line = next(x for x in str(exc).splitlines() if "expertmesh[jax]" in x)  # JAX missing on a host
            raise ImportError(line.split("ImportError: ", 1)[-1].strip()) from None
        raise
    return routers_, shards, groups, started


def _await_pings(routers: list, shards: list, groups: list, timeout_s: float) -> None:
    """Wait until every actor answers, or raise PlacementError naming those that did not."""
    refs = {r.ping.remote(): f"router {i}" if len(routers) > 1 else "the router" for i, r in enumerate(routers)}
    refs |= {s.ping.remote(): f"context shard {i}" for i, s in enumerate(shards)}
    refs |= {g.ping.remote(): f"expert group {i}" for i, g in enumerate(groups)}
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    ray.get(ready)  # an actor whose constructor failed raises its error here
    if pending:
        names = ", ".join(refs[r] for r in pending)
        raise PlacementError(f"cannot start the mesh: {names} did not start within {timeout_s:g} s; the cluster "
                             f"has {describe_resources(ray.available_resources())} free of "
                             f"{describe_resources(ray.cluster_resources())}")


