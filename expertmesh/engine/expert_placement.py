"""Where each expert is computed: the mesh's expert placement, per MoE layer.

A mesh starts from a contiguous partition (moe.expert_partition): group g holds and computes
experts partition[g] of every MoE layer. A placement moves that work while serving: per layer,
each expert is computed by one group or more (more: a redundant expert, as in DeepSeek's EPLB,
its rows split between the replicas). A group keeps its own partition's weights always (they
are what a router falls back to when every replica of an expert is lost); experts placed
elsewhere are loaded there first (`ExpertGroup.hold`), then every router switches at a step
boundary (`Engine.set_placement`), then groups let go of what the placement no longer names.
Which group computes a row never changes its output: logits are the same under any placement.

`balance` plans a placement from the expert load the routers counted: replicas for the hottest
experts into spare slots, then the replicas packed onto groups heaviest first, each onto the
least loaded group with room that does not hold that expert yet (longest processing time
first). A plan that keeps experts on their own groups wherever that costs almost nothing in
balance is preferred: it loads fewer weights.
"""

from __future__ import annotations

import dataclasses
import math

import torch

KEEP_SLACK = 0.05  # balancedness a plan may give up to keep experts where their weights already are


@dataclasses.dataclass(frozen=True)
class ExpertPlacement:
    """version: increases with every placement a mesh applies (a restarted router takes the
    newest its groups hold); layers: MoE layer -> per expert, the groups computing it."""

    version: int
    layers: dict[int, tuple[tuple[int, ...], ...]]

    def groups(self) -> set[int]:
        """Every group the placement sends rows to."""
        return {g for experts in self.layers.values() for gs in experts for g in gs}

    def placed(self, group: int, own: range) -> dict[int, list[int]]:
        """The experts `group` computes beyond its own partition range, per layer (what it must
        load before the placement applies)."""
        out = {layer: [e for e, gs in enumerate(experts) if group in gs and e not in own]
               for layer, experts in self.layers.items()}
        return {layer: es for layer, es in out.items() if es}

    def replicas(self) -> int:
        """Expert copies beyond one per expert, summed over layers."""
        return sum(len(gs) - 1 for experts in self.layers.values() for gs in experts)

    def check(self, num_experts: int, groups: set[int]) -> None:
        """Every expert of every layer computed by one group or more, all of them in `groups`."""
        for layer, experts in self.layers.items():
            if len(experts) != num_experts:
                raise ValueError(f"placement of layer {layer} names {len(experts)} experts; the model has {num_experts}")
            for e, gs in enumerate(experts):
                if not gs or len(set(gs)) != len(gs):
                    raise ValueError(f"layer {layer} expert {e}: groups {list(gs)}; each expert needs one group "
                                     "or more, none twice")
                if not set(gs) <= groups:
                    raise ValueError(f"layer {layer} expert {e} is placed on groups {sorted(set(gs) - groups)}, "
                                     f"which are not running; running groups: {sorted(groups)}")


def partition_placement(partition: list[range], moe_layers: list[int], version: int = 0) -> ExpertPlacement:
    """The placement of a contiguous partition: each expert on its own group only."""
    owner = tuple((g,) for g, r in enumerate(partition) for _ in r)
    return ExpertPlacement(version, {layer: owner for layer in moe_layers})


def group_loads(placement: ExpertPlacement, load: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Rows each group would compute under `placement` [layers of the placement, num_groups]
    from tokens per expert load [num_layers, E] (a replicated expert's rows split evenly)."""
    out = torch.zeros(len(placement.layers), num_groups, dtype=torch.float64)
    for i, (layer, experts) in enumerate(sorted(placement.layers.items())):
        for e, gs in enumerate(experts):
            for g in gs:
                out[i, g] += float(load[layer, e]) / len(gs)
    return out


def balancedness(loads: torch.Tensor, groups: list[int]) -> torch.Tensor:
    """Max over mean group load per layer (1.0: perfectly even), over `groups` [layers]."""
    per = loads[:, groups].double()
    mean = per.mean(1)
    return torch.where(mean > 0, per.max(1).values / mean.clamp_min(1e-12), torch.ones_like(mean))


def balance(load: torch.Tensor, partition: list[range], groups: list[int], moe_layers: list[int],
            redundant: int = 0, version: int = 1, current: ExpertPlacement | None = None) -> ExpertPlacement:
    """A placement over `groups` for tokens per expert `load` [num_layers, E] of `moe_layers`
    (partition: each group's own experts). redundant: extra expert copies per layer (hot experts
    replicated, at most one copy per group); each group computes at most
    ceil((E + redundant) / len(groups)) experts per layer. current: the placement in force; a
    layer it already balances at least as well (on the groups named) is kept as it is."""
    if not groups:
        raise ValueError("no expert group to place experts on")
    num_experts = sum(len(r) for r in partition)
    if isinstance(redundant, bool) or not isinstance(redundant, int) or redundant < 0:
        raise ValueError(f"redundant must be an integer >= 0, got {redundant!r}")
    redundant = min(redundant, num_experts * (len(groups) - 1))  # at most a copy of every expert on every group
    owner = {e: g for g, r in enumerate(partition) for e in r}
    layers = {}
    for layer in moe_layers:
        layers[layer] = _layer(load[layer].double(), owner, groups, redundant)
        kept = current.layers.get(layer) if current is not None else None
        if kept is not None and {g for gs in kept for g in gs} <= set(groups) and \
                _worst(kept, load[layer], groups) <= _worst(layers[layer], load[layer], groups):
            layers[layer] = kept
    return ExpertPlacement(version, layers)


def _worst(experts: tuple[tuple[int, ...], ...], load: torch.Tensor, groups: list[int]) -> float:
    """The most loaded group's rows under one layer's placement."""
    per = dict.fromkeys(groups, 0.0)
    for e, gs in enumerate(experts):
        for g in gs:
            per[g] += float(load[e]) / len(gs)
    return max(per.values())


def _layer(w: torch.Tensor, owner: dict[int, int], groups: list[int], redundant: int) -> tuple[tuple[int, ...], ...]:
    num_experts = len(w)
    w = w + w.sum() * 1e-9 + 1e-9  # experts never seen still get a place (and ties break by index)
    copies = [1] * num_experts
    for _ in range(redundant):
        e = max((e for e in range(num_experts) if copies[e] < len(groups)), key=lambda e: (w[e] / copies[e], -e),
                default=None)
        if e is None:
            break
        copies[e] += 1
    slots = math.ceil(sum(copies) / len(groups))
    items = sorted(((float(w[e]) / copies[e], e) for e in range(num_experts) for _ in range(copies[e])),
                   key=lambda it: (-it[0], it[1]))
    share = {e: float(w[e]) / copies[e] for e in range(num_experts)}
    plans = [_improve(*_pack(items, owner, groups, slots, keep), share, slots) for keep in (True, False)]
    kept, fastest = ([max(p[1].values()) for p in plans])
    best = plans[0] if kept <= fastest * (1 + KEEP_SLACK) else plans[1]
    return tuple(tuple(sorted(best[0][e])) for e in range(num_experts))


def _pack(items: list[tuple[float, int]], owner: dict[int, int], groups: list[int], slots: int, keep: bool
          ) -> tuple[dict[int, list[int]], dict[int, float]]:
    """Heaviest first onto the least loaded group with room that does not hold the expert yet;
    keep: an expert's first copy stays on its own group while that keeps the group within the
    mean load (its weights are there already)."""
    load = {g: 0.0 for g in groups}
    count = {g: 0 for g in groups}
    target = sum(w for w, _ in items) / len(groups) * (1 + KEEP_SLACK)
    where: dict[int, list[int]] = {}
    for w, e in items:
        free = [g for g in groups if count[g] < slots and g not in where.get(e, [])] or \
            [g for g in groups if g not in where.get(e, [])]  # (the last copies may find full groups only)
        g = min(free, key=lambda g: (load[g], g))
        home = owner.get(e)
        if keep and e not in where and home in free and load[home] + w <= target:
            g = home
        load[g] += w
        count[g] += 1
        where.setdefault(e, []).append(g)
    return where, load


@dataclasses.dataclass(frozen=True)
class Routes:
    """A placement as a router step reads it, over the groups running now: per MoE layer the
    groups computing each expert [E, R] (a row repeats its last group past its count) and how
    many [E]. An expert whose every placed group is lost goes to its own group, or to the group
    standing in for it (`host_of`); none at all: count 0 (the step says so)."""

    version: int
    hosts: dict[int, torch.Tensor]
    counts: dict[int, torch.Tensor]

    def route(self, layer: int, experts: torch.Tensor, turn: int) -> torch.Tensor:
        """The group computing each (row, expert) pair [P]: a replicated expert's pairs take its
        groups in turn (from `turn`, which the caller advances)."""
        counts = self.counts[layer][experts]
        if not bool(counts.all()):
            e = int(experts[counts == 0][0])
            raise LookupError(f"no running expert group computes expert {e} of layer {layer}: every group the "
                              "placement names for it is lost and its own group left the mesh")
        pick = (torch.arange(len(experts)) + turn) % counts
        return self.hosts[layer][experts, pick]


def routes(placement: ExpertPlacement, partition: list[range], unavailable: set[int],
           host_of: torch.Tensor) -> Routes:
    """The step's view of `placement` with the groups in `unavailable` (lost, or removed) left out."""
    owner = [g for g, r in enumerate(partition) for _ in r]
    hosts, counts = {}, {}
    for layer, experts in placement.layers.items():
        live = []
        for e, gs in enumerate(experts):
            keep = [g for g in gs if g not in unavailable]
            if not keep and int(host_of[owner[e]]) not in unavailable:  # its own group, or its stand-in
                keep = [int(host_of[owner[e]])]
            live.append(keep)
        width = max(1, max(len(k) for k in live))
        hosts[layer] = torch.tensor([(k + [k[-1]] * (width - len(k))) if k else [0] * width for k in live],
                                    dtype=torch.long)
        counts[layer] = torch.tensor([len(k) for k in live], dtype=torch.long)
    return Routes(placement.version, hosts, counts)


def _improve(where: dict[int, list[int]], load: dict[int, float], share: dict[int, float], slots: int,
             rounds: int = 200) -> tuple[dict[int, list[int]], dict[int, float]]:
    """Local search after packing: move a copy off the most loaded group, or swap it with a
    lighter one elsewhere, while that lowers the pair's larger load."""
    count = {g: 0 for g in load}
    for gs in where.values():
        for g in gs:
            count[g] += 1
    for _ in range(rounds):
        src = max(load, key=lambda g: (load[g], -g))
        best = None  # (the pair's larger load after, expert off src, dst, expert off dst or None)
        for e in [e for e, gs in where.items() if src in gs]:
            for dst in load:
                if dst == src or dst in where[e]:
                    continue
                if count[dst] < slots:
                    after = max(load[src] - share[e], load[dst] + share[e])
                    if after < load[src] - 1e-9 and (best is None or after < best[0]):
                        best = (after, e, dst, None)
                for f in [f for f, gs in where.items() if dst in gs and src not in gs and f != e]:
                    after = max(load[src] - share[e] + share[f], load[dst] - share[f] + share[e])
                    if after < load[src] - 1e-9 and (best is None or after < best[0]):
                        best = (after, e, dst, f)
        if best is None:
            break
        _, e, dst, f = best
        where[e][where[e].index(src)] = dst
        load[src] -= share[e]
        load[dst] += share[e]
        if f is None:
            count[src] -= 1
            count[dst] += 1
        else:
            where[f][where[f].index(dst)] = src
            load[dst] -= share[f]
            load[src] += share[f]
    return where, load
