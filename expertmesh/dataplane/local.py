"""The exchange of a step computed whole inside a colocated worker (engine/whole_step.py): its
own context shard and expert group, called in process on tensors (no copies through numpy, no
messages). See engine/exchange.py for the contract."""

from __future__ import annotations

from typing import Any

import torch

from expertmesh.engine.exchange import Exchange
from expertmesh.engine.step_plan import AttendItem, StepPlan


class LocalExchange(Exchange):
    def __init__(self, shard: Any, group: Any) -> None:
        """shard: an object with `attend_tensors` (the worker itself); group: one with `compute_tensors`."""
        self.shard, self.group = shard, group

    def begin(self, plan: StepPlan) -> "_LocalStep":
        return _LocalStep(self.shard, self.group, plan)


class _LocalStep(Exchange):
    def __init__(self, shard: Any, group: Any, plan: StepPlan) -> None:
        self.shard, self.group, self._plan = shard, group, plan
        self._reads: list[tuple[int, int, int, dict]] = []

    def attend(self, layer, requests):
        items_of, out = self._plan.layers[layer].attend, {}
        for shard, active in requests.items():
            items = [AttendItem(it.context_id, q, it.q_pos, it.visits, it.top_pages, it.segment)
                     for (j, q), it in ((a, items_of[shard][a[0]]) for a in active)]
            res = self.shard.attend_tensors(layer, items)
            out[shard] = [(torch.as_tensor(o), torch.as_tensor(lse)) for o, lse, _ in res]
            self._reads.extend((layer, shard, j, reads) for (j, _), (_, _, reads) in zip(active, res))
        return lambda: out

    def experts(self, layer, requests):
        out = {g: self.group.compute_tensors(layer, rows, ids) for g, (rows, ids) in requests.items()}
        return lambda: out

    def end(self):
        return self._reads
