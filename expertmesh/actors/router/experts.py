"""The router's side of the mesh's expert groups changing while it serves: expert groups added
and taken out (`Mesh.add_groups`, `Mesh.remove_groups`) and the expert placement the mesh
applies (`Mesh.balance_experts`; engine/expert_placement.py). A collaborator of the router.

The mesh applies a placement in three moves, so that no step ever sends rows to a group that
does not hold their experts: every group loads what it places there (`ExpertGroup.hold`), then
every router routes by it (`set_placement`: returns once no step of this router routes by an
earlier one), then the groups let go of what it no longer places there (`ExpertGroup.settle`).
A router that starts later (a restart) takes the newest placement its groups hold.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
import ray

from expertmesh.actors.names import lookup
from expertmesh.engine.engine import Engine
from expertmesh.engine.expert_placement import ExpertPlacement

PLACEMENT_WAIT_S = 60.0  # a router's steps that began under the previous placement finishing
ASK_S = 10.0  # a group's placement, asked as a router starts
log = logging.getLogger("expertmesh.router")


class Experts:
    def __init__(self, engine: Engine, groups: list[Any]) -> None:
        """groups: handles by index, None where one was taken out of the mesh."""
        self.engine, self.groups = engine, list(groups)
        engine.removed |= {g for g, h in enumerate(self.groups) if h is None}

    def adopt_newest(self) -> None:
        """The newest placement the running groups hold (a router that starts while one is in
        force); none: the partition."""
        asked = [g for g in self.groups if isinstance(g, ray.actor.ActorHandle)]
        refs = [g.expert_placement.remote() for g in asked]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=ASK_S)
        held = []
        for ref in ready:
            try:
                held.append(ray.get(ref))
            except ray.exceptions.RayError:  # lost or restarting: the others answer
                continue
        newest = max((p for p in held if p is not None), key=lambda p: p.version, default=None)
        if newest is not None and not newest.groups() & self.engine.removed:
            self.engine.placement = newest

    def describe(self) -> dict:
        """Groups by index (None: taken out), their own experts, and the placement in force."""
        p = self.engine.placement
        return {"groups": len(self.groups), "removed": sorted(self.engine.removed),
                "partition": [[r.start, r.stop] for r in self.engine.partition],
                "placement_version": p.version if p is not None else 0,
                "replicas": p.replicas() if p is not None else 0}

    def load(self) -> np.ndarray:
        """Tokens routed to each expert per layer since this router started [layers, experts]."""
        return self.engine.expert_load.numpy().copy()

    async def set_placement(self, placement: ExpertPlacement) -> bool:
        """Route by `placement` from the next step; True once no step routes by an earlier one."""
        bad = placement.groups() - {g for g, h in enumerate(self.groups) if h is not None}
        if bad:
            raise ValueError(f"the expert placement names groups {sorted(bad)}, which are not in the mesh")
        placement.check(self.engine.cfg.num_experts, placement.groups())
        done = await asyncio.to_thread(self.engine.set_placement, placement, PLACEMENT_WAIT_S)
        if not done:
            log.warning("steps under the previous expert placement still ran %g s after placement %d",
                        PLACEMENT_WAIT_S, placement.version)
        return done

    async def add_groups(self, names: dict[int, str]) -> list[int]:
        """Expert groups started for this mesh (`Mesh.add_groups`), index -> actor name: the next
        step's group takes them in; they compute nothing until a placement puts experts there."""
        first = len(self.groups)
        if sorted(names) != list(range(first, first + len(names))):
            raise ValueError(f"expert groups are added from index {first} on; got {sorted(names)}")
        handles = dict(zip(names, lookup(list(names.values()))))
        self.engine.add_groups(len(handles))
        await asyncio.to_thread(self.engine.exchange.add_groups, handles)  # after a step in flight
        self.groups += list(handles.values())
        return list(handles)

    async def remove_groups(self, groups: list[int]) -> None:
        """Expert groups taken out of the mesh (the placement in force computes nothing there)."""
        unknown = [g for g in groups if not 0 <= g < len(self.groups) or self.groups[g] is None]
        if unknown:
            raise ValueError(f"expert groups {unknown} are not in the mesh; it has "
                             f"{[g for g, h in enumerate(self.groups) if h is not None]}")
        self.engine.remove_groups(set(groups))
        await asyncio.to_thread(self.engine.exchange.remove_groups, set(groups))
        for g in groups:
            self.groups[g] = None
