"""Cluster bring-up and actor placement.

With no address a local Ray cluster starts, declaring the `context_shard` and `expert_group`
custom resources; with "auto" or a URL an existing cluster is joined. Actors reserve one unit
of their kind's custom resource wherever the cluster declares it, so the same code places
shards on shard hosts and expert groups on expert hosts in a KubeRay cluster, a
`ray.cluster_utils.Cluster` test cluster or a laptop.
"""

from __future__ import annotations

import os

import ray

from expertmesh.errors import DeviceError
from expertmesh.actors.names import (CONTEXT_SHARD, EXPERT_GROUP, NAMESPACE, ROUTER, WORKER,  # noqa: F401
                                     actor_name, lookup)  # re-exported for callers


def connect(address: str | None, context_shards: int | None, expert_groups: int | None,
            env: dict[str, str] | None = None) -> bool:
    """Make sure Ray is initialised; return True if this call started it. env: environment
    variables of this job's workers (and of the actors it creates). A local cluster declares
    the actors' units; counts None: those of the layout picked for this host (layout.py)."""
    if ray.is_initialized():
        return False
    if address is None:
        from expertmesh.platform.layout import local_resources, pick_layout

        picked = pick_layout(context_shards, expert_groups, None, local_resources())
        context_shards, expert_groups = picked.context_shards, picked.expert_groups
        ray.init(
            address="local",  # a new local cluster even where a `ray start` cluster runs on this machine
            resources={CONTEXT_SHARD: context_shards, EXPERT_GROUP: expert_groups},
            include_dashboard=False, log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore", **(env or {})}},
        )
    else:
        ray.init(address=address, log_to_driver=False, **({"runtime_env": {"env_vars": env}} if env else {}))
    return True


# Actor restarts (DESIGN.md "Faults"): every mesh actor restarts after a crash, for as long as
# the mesh lives. Calls to shards and expert groups are safe to run again (attend/compute only
# read; store/drop overwrite), so Ray resubmits a call in flight once the actor is back. The
# router's requests are not resubmitted by Ray: its clients retry once themselves.
TASK_RETRIES = {CONTEXT_SHARD: 1, EXPERT_GROUP: 1, None: 0}


def actor_options(kind: str | None, threads: int | None = None, also: str | None = None) -> dict:
    """Ray options for an actor of a kind (None: the router): its custom resource where the
    cluster declares it (and that of `also`, for a colocated worker holding both), and its
    restart policy."""
    opts: dict = {"num_cpus": 0, "max_restarts": -1, "max_task_retries": TASK_RETRIES[kind]}
    declared = ray.cluster_resources()
    res = {k: 1 for k in (kind or ROUTER, also) if k is not None and declared.get(k, 0) >= 1}
    if res:
        opts["resources"] = res
    return opts


def missing_resources(context_shards: int, expert_groups: int) -> str | None:
    """Why the cluster cannot place the mesh's actors now (None: it can), with the numbers."""
    total, free = ray.cluster_resources(), ray.available_resources()
    missing = []
    for kind, need in ((CONTEXT_SHARD, context_shards), (EXPERT_GROUP, expert_groups)):
        if need and total.get(kind, 0) >= 1 and free.get(kind, 0) < need:
            missing.append(f"{need} `{kind}` (one per actor; the cluster has {free.get(kind, 0):g} free "
                           f"of {total.get(kind, 0):g})")
    return "the mesh needs " + " and ".join(missing) if missing else None


def threads_per_actor(actors: int) -> int:
    """A CPU share for torch threads in each actor of this host."""
    return max(1, (os.cpu_count() or 1) // max(1, actors))


def gpus_per_mesh_actor(device: str, gpus_per_actor: float | None, n_actors: int) -> float:
    """GPUs each actor asks Ray for (0: none); fails at once where "cuda" meets no GPU."""
    total = ray.cluster_resources().get("GPU", 0)
    if device.startswith("cuda") and total == 0:
        raise DeviceError(f"device={device!r}, but the Ray cluster has no GPUs "
                          f"({describe_resources(ray.cluster_resources())}); start Ray on GPU hosts, or pass "
                          "device='cpu' (or 'auto')")
    if device == "cpu" or total == 0:
        return 0
    if gpus_per_actor is not None:
        return gpus_per_actor
    return min(1.0, int(total / n_actors * 10_000) / 10_000)


def describe_resources(res: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())
                           if not k.startswith(("node:", "memory", "object_store"))) + "}"
