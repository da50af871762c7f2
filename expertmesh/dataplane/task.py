"""The reference data plane: one call per actor per layer (a method call in-process, a Ray task
for an actor handle). See engine/exchange.py for the contract."""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import ray
import torch

from expertmesh.dataplane.calls import ActorExchange, _remote
from expertmesh.dataplane.liveness import RECHECK_S, down
from expertmesh.engine.exchange import STEP_TIMEOUT_S, Exchange
from expertmesh.engine.step_plan import AttendItem, StepPlan


class TaskExchange(ActorExchange):
    """One call per actor per layer: a method call in-process, or a Ray task. Steps may run
    concurrently (router lanes): each gets its own `_TaskStep`."""

    def __init__(self, shards: list[Any], groups: list[Any], router: str = "") -> None:
        self.shards, self.groups, self.router = shards, groups, router
        self._absent: tuple[dict[int, str], dict[int, str]] = ({}, {})
        self._checked = -RECHECK_S

    def begin(self, plan: StepPlan) -> "_TaskStep":
        return _TaskStep(self.shards, self.groups, plan)

    def absent(self, fresh: bool = False) -> tuple[dict[int, str], dict[int, str]]:
        """Asked of Ray at most every RECHECK_S, or now when fresh (a step calls the actors
        directly: no group)."""
        if fresh or time.monotonic() - self._checked >= RECHECK_S:
            self._checked = time.monotonic()
            self._absent = ({i: st for i, h in enumerate(self.shards) if h is not None and (st := down(h))},
                            {g: st for g, h in enumerate(self.groups) if h is not None and (st := down(h))})
        return dict(self._absent[0]), dict(self._absent[1])

    def shard_handle(self, shard: int) -> Any:
        return self.shards[shard]

    def add_shards(self, handles: list[Any], first: int) -> None:
        shards = self.shards + [None] * (first - len(self.shards))
        self.shards = [*shards, *handles]  # a step in flight keeps the list it began with

    def group_handle(self, group: int) -> Any:
        return self.groups[group]

    def remove_shards(self, shards: set[int]) -> None:
        self.shards = [None if i in shards else h for i, h in enumerate(self.shards)]

    def add_groups(self, handles: dict[int, Any]) -> None:
        groups = self.groups + [None] * (max(handles) + 1 - len(self.groups))
        self.groups = [handles.get(g, h) for g, h in enumerate(groups)]  # a new list: steps in flight keep theirs

    def remove_groups(self, groups: set[int]) -> None:
        self.groups = [None if g in groups else h for g, h in enumerate(self.groups)]


class _TaskStep(Exchange):
    def __init__(self, shards: list[Any], groups: list[Any], plan: StepPlan) -> None:
        self.shards, self.groups, self._plan = shards, groups, plan
        self._reads: list[tuple[int, int, int, dict]] = []

    def attend(self, layer, requests):
        items_of = self._plan.layers[layer].attend
        calls = {}
        for shard, active in requests.items():
            items = [AttendItem(it.context_id, q.float().cpu().numpy(), it.q_pos, it.visits, it.top_pages, it.segment)
                     for (j, q), it in ((a, items_of[shard][a[0]]) for a in active)]
            calls[shard] = (active, self._call(self.shards[shard], "attend", layer, items))

        def wait():
            out = {}
            for shard, (active, reply) in calls.items():
                res = reply()
                out[shard] = [(torch.from_numpy(np.array(o)), torch.from_numpy(np.array(lse))) for o, lse, _ in res]
                self._reads.extend((layer, shard, j, reads) for (j, _), (_, _, reads) in zip(active, res))
            return out
        return wait

    def experts(self, layer, requests):
        calls = {g: self._call(self.groups[g], "compute", layer, rows.float().cpu().numpy(), ids.cpu().numpy())
                 for g, (rows, ids) in requests.items()}
        return lambda: {g: torch.from_numpy(np.array(reply())) for g, reply in calls.items()}

    def end(self):
        return self._reads

    @staticmethod
    def _call(target: Any, method: str, *args) -> Callable[[], Any]:
        """Start a call; return a function that waits for its result."""
        if _remote(target):
            ref = getattr(target, method).remote(*args)
            return lambda: ray.get(ref, timeout=STEP_TIMEOUT_S)
        result = getattr(target, method)(*args)  # in-process: now
        return lambda: result
