"""The expert side of a router step, a part of the engine (engine.py): (token row, expert) pairs
dispatched to the expert groups that compute them and combined, by the partition or by the
expert placement in force (expert_placement.py: redundant copies in turn), around groups Ray
does not report alive (a running group stands in, holding their experts too) and groups taken
out of the mesh; the rows each group computed (its load)."""

from __future__ import annotations

import time
from typing import Any

import torch

from expertmesh.engine.expert_placement import ExpertPlacement, Routes, routes
from expertmesh.engine.takeover import serving_map
from expertmesh.errors import Unavailable


class ExpertRouting:
    """Engine methods over its partition, placement, stand-ins and group counts (set up in
    Engine.__init__)."""

    # -- experts --------------------------------------------------------------------------
    def _dispatch(self, step: Any, layer, rows: torch.Tensor, experts: torch.Tensor):
        """Send (row, expert) pairs to the groups holding the experts; a function combining
        their outputs [P, H] in pair order."""
        if not step.plan.layers[layer.index].experts:  # no rows left at this layer (segments only)
            step.exchange.experts(layer.index, {})()  # nothing goes out (a micro-batch still takes its turns)
            return lambda: torch.zeros(rows.shape, dtype=torch.float32, device=rows.device)
        n_groups, lengths = len(self.partition), torch.tensor([b - a for a, b in step.spans])
        step.expert_counts.append((layer.index, torch.bincount(experts.reshape(-1).cpu(),
                                                               minlength=self.expert_load.shape[1])))
        if n_groups == 1 and step.routes is None:  # every pair to the one group (or its stand-in): no split
            only = int(self._host_of[0])
            requests, picks = {only: (rows, experts)}, None
            counts = lengths[:, None] * layer.cfg.top_k
            step.host_counts.append((layer.index, torch.bincount(torch.tensor([only]), minlength=n_groups)
                                     * experts.numel()))
        else:
            if step.routes is None:
                group = self._group_of(experts.cpu())  # [P]
                host = self._host_of[group]  # a lost group's rows go to the group standing in for it
            else:  # the placement's groups, a replicated expert's in turn
                try:
                    host = group = step.routes.route(layer.index, experts.reshape(-1).cpu(), self._turn)
                except LookupError as exc:
                    raise Unavailable(f"{exc}; rebalance the experts (Mesh.balance_experts)") from None
                self._turn += 1
            step.host_counts.append((layer.index, torch.bincount(host, minlength=n_groups)))
            requests, picks = {}, {}
            for g in torch.unique(host).tolist():
                pick = (host == g).nonzero().squeeze(1).to(rows.device)
                requests[g], picks[g] = (rows[pick], experts[pick]), pick
            # pairs per sequence and group, in one count (pairs are token-major: k per token)
            seq_of_pair = torch.repeat_interleave(torch.arange(len(step.spans)), lengths * layer.cfg.top_k)
            counts = torch.bincount(seq_of_pair * n_groups + group, minlength=len(step.spans) * n_groups)
        replies = step.exchange.experts(layer.index, requests)
        step.group_counts.append((step.batch, counts.view(-1, n_groups)))  # onto the requests once, at the end

        def combine() -> torch.Tensor:
            t0 = time.perf_counter()
            done = replies()
            self.waits["expert_groups"] += time.perf_counter() - t0
            if picks is None:  # one group: its output in pair order (nothing when no pairs went)
                return done[only].to(device=rows.device, dtype=torch.float32) if only in done else \
                    torch.zeros(rows.shape, dtype=torch.float32, device=rows.device)
            y = torch.empty(rows.shape, dtype=torch.float32, device=rows.device)
            for g, pick in picks.items():
                y[pick] = done[g].to(y.device)
            return y
        return combine

    @staticmethod
    def _count_groups(step: Any) -> None:
        """Tokens each request sent to each expert group this step, summed over its layers."""
        sums: dict[int, tuple[list, torch.Tensor]] = {}
        for batch, counts in step.group_counts:  # one batch list until the last layer narrows it
            held = sums.get(id(batch))
            sums[id(batch)] = (batch, counts if held is None else held[1] + counts)
        for batch, counts in sums.values():
            for seq, per in zip(batch, counts.tolist()):
                seq.group_tokens.update({g: n for g, n in enumerate(per) if n})

    def group_load(self) -> torch.Tensor:
        """(Token, expert) rows each expert group computed, per layer, since the engine started
        [layers, groups] (a lost group's rows count for the group that stood in)."""
        return self.group_rows.clone()

    # -- expert placement (expert_placement.py) --------------------------------------------
    def set_placement(self, placement: ExpertPlacement, timeout_s: float) -> bool:
        """Route by `placement` from the next step on; returns once no step routes by an earlier
        one (False: steps still did after timeout_s). Its groups must hold its experts already."""
        with self._placing:
            self.placement, self._routes = placement, None
            return self._placing.wait_for(lambda: not any(n for v, n in self._in_flight.items()
                                                          if n and v != placement.version), timeout_s)

    def _routes_over(self, absent_groups: dict[int, str]) -> Routes | None:
        if self.placement is None:
            return None
        key = (self.placement.version, frozenset(absent_groups), frozenset(self.removed), tuple(self._host_of.tolist()))
        if self._routes is None or self._routes[0] != key:
            self._routes = (key, routes(self.placement, self.partition, set(absent_groups) | self.removed,
                                        self._host_of))
        return self._routes[1]

    def add_groups(self, n: int) -> list[int]:
        """Expert groups added to the mesh (holding no experts of their own: a placement puts
        experts there); their indices. The exchange takes their actors in (router)."""
        first, empty = len(self.partition), range(self.cfg.num_experts, self.cfg.num_experts)
        self.partition = [*self.partition, *([empty] * n)]
        self._host_of = torch.cat([self._host_of, torch.arange(first, first + n)])
        self.group_rows = torch.cat([self.group_rows, torch.zeros(self.group_rows.shape[0], n, dtype=torch.long)], 1)
        return list(range(first, first + n))

    def remove_groups(self, groups: set[int]) -> None:
        """Expert groups taken out of the mesh: no step sends them rows (the placement in force
        must not name them)."""
        if self.placement is not None and (named := groups & self.placement.groups()):
            raise ValueError(f"the expert placement in force still computes experts on groups {sorted(named)}")
        self.removed |= groups
        self._routes = None

    def _stand_in_experts(self, absent: dict[int, str]) -> None:
        """Who computes the experts of groups Ray does not report alive: a running group loads
        them from the checkpoint (bounded wait) and holds them until the lost group is back."""
        serving = serving_map(len(self.partition), {**absent, **{g: "removed" for g in self.removed}},
                              [len(r) for r in self.partition])
        serving = {g: h for g, h in serving.items() if g not in self.removed and len(self.partition[g])}
        if serving == self.group_serving:
            return
        self._changed("group", self.group_serving, serving, "experts")
        for g, h in self.group_serving.items():
            if serving.get(g) != h:
                self.exchange.release_experts(h, self.partition[g])
        for g, h in serving.items():
            if self.group_serving.get(g) != h:
                self.exchange.adopt(h, self.partition[g])
        self.group_serving = serving
        self._host_of = torch.tensor([serving.get(g, g) for g in range(len(self.partition))], dtype=torch.long)

