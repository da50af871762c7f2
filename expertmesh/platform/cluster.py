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

CONTEXT_SHARD = "context_shard"
EXPERT_GROUP = "expert_group"


def connect(address: str | None, context_shards: int, expert_groups: int) -> bool:
    """Make sure Ray is initialised; return True if this call started it."""
    if ray.is_initialized():
        return False
    if address is None:
        ray.init(
            address="local",  # a new local cluster even where a `ray start` cluster runs on this machine
            resources={CONTEXT_SHARD: context_shards, EXPERT_GROUP: expert_groups},
            include_dashboard=False, log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}},
        )
    else:
        ray.init(address=address, log_to_driver=False)
    return True


def actor_options(kind: str | None, threads: int | None = None) -> dict:
    """Ray options for an actor of a kind: its custom resource where the cluster declares it."""
    opts: dict = {"num_cpus": 0}
    if kind is not None and ray.cluster_resources().get(kind, 0) >= 1:
        opts["resources"] = {kind: 1}
    return opts


def threads_per_actor(actors: int) -> int:
    """A CPU share for torch threads in each actor of this host."""
    return max(1, (os.cpu_count() or 1) // max(1, actors))
