"""Expert groups changing while the mesh serves (`Mesh.balance_experts`, `Mesh.add_groups`,
`Mesh.remove_groups`): the driver's side. Each change is an expert placement
(engine/expert_placement.py) applied in three moves (actors/router/experts.py): the groups load
what it places on them, every router routes by it, the groups let go of the rest. No step sends
rows to a group without their experts, and logits stay the same (a row's expert output does
not depend on the group computing it).
"""

from __future__ import annotations

import time

import numpy as np
import ray
import torch

from expertmesh.actors.expert_group import RemoteExpertGroup
from expertmesh.actors.names import EXPERT_GROUP, NAMESPACE, actor_name, mesh_of
from expertmesh.dataplane.liveness import actor_row, down
from expertmesh.engine.expert_placement import (
    ExpertPlacement,
    balance,
    balancedness,
    group_loads,
    partition_placement,
)
from expertmesh.errors import PlacementError, Unavailable
from expertmesh.platform.cluster import actor_options


class ExpertGroups:
    """The mesh's expert groups as its routers see them (asked of the first that answers)."""

    def __init__(self, routers: list, moe_layers: list[int], timeout_s: float) -> None:
        self.routers, self.moe_layers, self.timeout_s = [r for r in routers if not down(r)], moe_layers, timeout_s
        if not self.routers:
            raise Unavailable("no router of the mesh is running; retry once one is back")
        self.info = ray.get(self.routers[0].expert_groups.remote(), timeout=timeout_s)
        self.handles, self.current = self.info["handles"], self.info["placement"]
        self.partition = [range(a, b) for a, b in self.info["partition"]]
        if not self.partition:
            raise ValueError("this model has no MoE layers: there are no experts to place")

    def running(self, without: set[int] = frozenset()) -> list[int]:
        """Groups in the mesh that Ray reports alive."""
        return [g for g, h in enumerate(self.handles) if h is not None and g not in without and not down(h)]

    def load(self) -> torch.Tensor:
        """Tokens routed to each expert per layer, summed over the routers [layers, experts]."""
        tables = ray.get([r.expert_load_table.remote() for r in self.routers], timeout=self.timeout_s)
        return torch.from_numpy(np.sum(tables, axis=0))

    def placement_now(self) -> ExpertPlacement:
        return self.current or partition_placement(self.partition, self.moe_layers)

    def plan(self, groups: list[int], redundant: int, load: torch.Tensor | None = None) -> tuple[ExpertPlacement, dict]:
        """A balanced placement over `groups`, and the balancedness before and planned per layer
        (on the load it was planned from)."""
        load = self.load() if load is None else load
        version = max(self.info["placement_version"], self.current.version if self.current else 0) + 1
        placement = balance(load, self.partition, groups, self.moe_layers, redundant, version, self.placement_now())
        n = len(self.partition)
        before = balancedness(group_loads(self.placement_now(), load, n), self.running())
        after = balancedness(group_loads(placement, load, n), groups)
        layers = sorted(placement.layers)
        return placement, {"layers": layers, "balancedness_before": dict(zip(layers, before.tolist())),
                           "balancedness_planned": dict(zip(layers, after.tolist())),
                           "tokens_counted": int(load.sum())}

    def apply(self, placement: ExpertPlacement) -> dict:
        """Groups hold it, routers route by it, groups let go of the rest."""
        t0 = time.perf_counter()
        named = placement.groups()
        live = {g: h for g, h in enumerate(self.handles) if h is not None}
        refs = {g: h.hold.remote(placement) for g, h in live.items()}
        ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.timeout_s)  # one bound for all
        loaded = 0
        for g, ref in refs.items():
            try:
                loaded += ray.get(ref, timeout=0.1)["loaded"]
            except (ray.exceptions.RayError, TimeoutError) as exc:
                if g in named:  # a group the placement needs cannot hold its part: nothing changes
                    raise Unavailable(f"expert group {g} could not load the experts placed on it "
                                      f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from None
        ray.get([r.set_expert_placement.remote(placement) for r in self.routers], timeout=self.timeout_s)
        settled = [h.settle.remote(placement.version) for h in live.values()]
        ray.wait(settled, num_returns=len(settled), timeout=self.timeout_s)
        for ref in settled:
            try:
                ray.get(ref, timeout=0.1)
            except (ray.exceptions.RayError, TimeoutError):
                pass  # a lost group holds nothing
        moved = sum(1 for experts in placement.layers.values() for e, gs in enumerate(experts)
                    for g in gs if e not in self.partition[g])
        return {"version": placement.version, "replicas": placement.replicas(), "placed_off_own_group": moved,
                "loaded": loaded, "seconds": time.perf_counter() - t0}


def balance_experts(routers: list, moe_layers: list[int], redundant: int, timeout_s: float) -> dict:
    groups = ExpertGroups(routers, moe_layers, timeout_s)
    placement, report = groups.plan(groups.running(), redundant)
    return report | groups.apply(placement)


def remove_groups(routers: list, moe_layers: list[int], indices: list[int], redundant: int, colocated: bool,
                  timeout_s: float) -> dict:
    if colocated:
        raise ValueError("the mesh's expert groups are colocated workers that also hold context shards; "
                         "they cannot be taken out on their own")
    groups = ExpertGroups(routers, moe_layers, timeout_s)
    bad = [g for g in indices if not isinstance(g, int) or not 0 <= g < len(groups.handles)
           or groups.handles[g] is None]
    if bad or not indices:
        raise ValueError(f"expert groups {bad or indices} are not in the mesh; its groups: "
                         f"{[g for g, h in enumerate(groups.handles) if h is not None]}")
    staying = groups.running(without=set(indices))
    if not staying:
        raise ValueError(f"taking out groups {indices} would leave no running expert group")
    placement, report = groups.plan(staying, redundant)
    report |= groups.apply(placement)
    ray.get([r.remove_groups.remote(list(indices)) for r in groups.routers], timeout=timeout_s)
    for g in indices:
        ray.kill(groups.handles[g])
    return report | {"removed": list(indices)}


def start_groups(routers: list, moe_layers: list[int], n: int, redundant: int, timeout_s: float
                 ) -> tuple[list, dict]:
    """n expert groups made like a running one, added to the mesh, experts balanced onto them."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    groups = ExpertGroups(routers, moe_layers, timeout_s)
    args = _spec(groups)
    row = actor_row(groups.routers[0])
    base, first = mesh_of(row["Name"]), len(groups.handles)
    if base is None:
        raise ValueError("expert groups can be added to a mesh of named actors only (Mesh.start)")
    life = {"lifetime": "detached"} if row.get("IsDetached") else {}
    checkpoint, _, _, *rest = args
    num_experts = sum(len(r) for r in groups.partition)
    empty = range(num_experts, num_experts)  # experts of its own: none (a placement puts them there)
    names = {first + k: actor_name(base, EXPERT_GROUP, first + k) for k in range(n)}
    new = {}
    try:
        for g, name in names.items():
            opts = actor_options(EXPERT_GROUP) | life | {"name": name, "namespace": NAMESPACE}
            new[g] = RemoteExpertGroup.options(**opts).remote(checkpoint, g, empty, *rest)
        ready, pending = ray.wait([h.ping.remote() for h in new.values()], num_returns=n, timeout=timeout_s)
        ray.get(ready)
        if pending:
            free, total = ray.available_resources(), ray.cluster_resources()
            raise PlacementError(f"cannot add {n} expert group(s): {len(pending)} did not start within "
                                 f"{timeout_s:g} s; the cluster has {free.get(EXPERT_GROUP, 0):g} `{EXPERT_GROUP}` "
                                 f"free of {total.get(EXPERT_GROUP, 0):g}")
        ray.get([r.add_groups.remote(names) for r in groups.routers], timeout=timeout_s)
    except BaseException:
        for h in new.values():
            ray.kill(h)
        raise
    groups = ExpertGroups(routers, moe_layers, timeout_s)  # with the new ones
    placement, report = groups.plan(groups.running(), redundant)
    return list(new.values()), report | groups.apply(placement) | {"added": list(names)}


def _spec(groups: ExpertGroups) -> tuple:
    """The constructor arguments of the first running group that answers."""
    for h in groups.handles:
        if h is None:
            continue
        try:
            return ray.get(h.group_spec.remote(), timeout=10)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ray.exceptions.RayTaskError):
            continue
    raise Unavailable("cannot add expert groups: none of the mesh's groups answers to say how it was made")
