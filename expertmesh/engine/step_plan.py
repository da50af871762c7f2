"""The plan of one router step: which rows attend over which shards at each layer, and which
expert groups take part. A frozen value, built once per step before any layer runs.

The router sends every participating actor its own slice (`PeerPlan`) in one call per step;
within the step, messages follow the plan's order on both sides, so no per-layer call names
what comes next. Pathways still come from the router: a request whose shards are chosen from
its queries (prefill with `top_shards` on a global layer) gets an item of its own on every
candidate shard, and the router flags at that layer which of them it chose.

Shapes: rows are indices into the step's flat token batch of that layer (the last layer drops
context segments' rows, which need only its K/V).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from expertmesh.engine.pathway import choose_shards, segment_visible
from expertmesh.engine.sequence import Sequence
from expertmesh.engine.takeover import alias


@dataclasses.dataclass
class AttendItem:
    """The queries of one or more requests over one context: q [T, Hq, D], positions [T]."""

    context_id: str
    q: np.ndarray
    q_pos: np.ndarray
    visits: dict[str, int]  # request id -> query tokens in this item
    top_pages: int | None = None  # None: every page (exact); p: the p best-bounded pages
    segment: tuple[str, int, int] | None = None  # (file, start, end): reopen from the store if needed


@dataclasses.dataclass(frozen=True)
class ItemPlan:
    """The queries of one or more requests of one context over one shard at one layer."""

    context_id: str
    rows: np.ndarray  # [t] rows of the layer's batch
    q_pos: np.ndarray  # [t] their positions
    visits: dict[str, int]  # request id -> query tokens in this item
    top_pages: int | None
    segment: tuple[str, int, int] | None  # (file, start, end) for a shard to reopen from the store
    seqs: tuple[int, ...]  # the requests (indices into the layer's live batch)
    chooser: int | None = None  # a request whose shards are chosen at this layer from its queries
    owner: int = -1  # the shard whose segment this is (another shard stands in for a lost one: takeover.py)
    order: int = 0  # the segment's place in its context: partials merge in context order, wherever it lives


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    index: int
    live: tuple[int, ...]  # indices into the step's batch of the sequences whose rows this layer runs
    attend: dict[int, tuple[ItemPlan, ...]]  # shard -> items
    experts: bool  # an MoE layer with rows to route
    pairs: int = 0  # (token, expert) pairs routed at this layer: what one group receives at most


@dataclasses.dataclass(frozen=True)
class Part:
    """One exchange of a peer within a step: attention items of a layer, or a layer's experts."""

    kind: str  # "attend" | "experts"
    layer: int
    items: tuple[tuple, ...] = ()  # attend: (context_id, rows, q_pos, visits, top_pages, segment)
    packed: int = 0  # experts: > 0: count and rows come in one message of this many rows (small steps)
    pairs: int = 0  # experts: the most (token, expert) rows the group can get at this layer

    def request_floats(self, heads: int, head_dim: int, hidden: int) -> int:
        """Size of the router's first fp32 message of this exchange (attend: a flag per item, then
        the items' query rows; packed experts: the count, then the rows); 0: an int64 count comes first."""
        if self.kind == "attend":
            return len(self.items) + sum(it[1] for it in self.items) * heads * head_dim
        return 1 + self.packed * (hidden + 1) if self.packed else 0


@dataclasses.dataclass(frozen=True)
class PeerPlan:
    """What one actor does in a step, in order. `generation` names the process group the step
    runs over (a step of an earlier group fails at once)."""

    generation: int
    parts: tuple[Part, ...]
    heads: int  # query heads
    head_dim: int
    hidden: int


@dataclasses.dataclass(frozen=True)
class StepPlan:
    layers: tuple[LayerPlan, ...]
    groups: tuple[int, ...]  # expert groups taking part (every group when any layer routes experts)
    rows: int = 0  # token rows of the step's batch (the first layer's; no layer has more)

    def peer(self, generation: int, shard: int | None, group: int | None, heads: int, head_dim: int,
             hidden: int, pack: bool = True) -> PeerPlan | None:
        """The slice of an actor holding context shard `shard` and/or expert group `group`
        (pack: small expert exchanges in one padded message, see `packed_rows`)."""
        parts = []
        for lp in self.layers:
            if shard is not None and shard in lp.attend:
                parts.append(Part("attend", lp.index, tuple(
                    (it.context_id, len(it.rows), it.q_pos, it.visits, it.top_pages, it.segment)
                    for it in lp.attend[shard])))
            if group is not None and lp.experts and group in self.groups:
                parts.append(Part("experts", lp.index, packed=packed_rows(lp.pairs, hidden) if pack else 0,
                                  pairs=lp.pairs))
        return PeerPlan(generation, tuple(parts), heads, head_dim, hidden) if parts else None


def interleave(peers: list[PeerPlan | None]) -> PeerPlan | None:
    """One actor's slice of a step of micro-batches (ping_pong.py): their parts in the order the
    router runs them, layer by layer: every micro-batch's attention, then every one's experts."""
    got = [p for p in peers if p is not None]
    if len(got) <= 1:
        return got[0] if got else None
    order = sorted(((part.layer, part.kind != "attend", m, k), part) for m, p in enumerate(peers) if p is not None
                   for k, part in enumerate(p.parts))
    return dataclasses.replace(got[0], parts=tuple(part for _, part in order))


PACK_LIMIT = 1 << 16  # floats: below this, a group's rows travel padded to the most it can get, in one message


def packed_rows(pairs: int, hidden: int) -> int:
    """Rows of the one-message expert exchange (0: a count message, then the rows)."""
    return pairs if 0 < pairs * (hidden + 1) <= PACK_LIMIT else 0


def build_plan(batch: list[Sequence], spans: list[tuple[int, int]], positions: torch.Tensor, model,
               summaries: dict, num_groups: int, serving: dict[int, int] | None = None,
               running_groups: tuple[int, ...] | None = None) -> StepPlan:
    """The step's plan. Pathways that do not depend on queries are fixed here (and recorded in
    each sequence's `layer_shards`); the rest are marked to be chosen at their layer.
    serving: lost shard -> the shard that serves its segments from the store (takeover.py);
    running_groups: the expert groups taking part (others' experts stand in on them)."""
    serving = serving or {}
    layers, last = [], len(model.layers) - 1
    pos_all = positions.cpu().numpy()  # per-sequence slices below: numpy, not one tensor op per slice
    for layer in model.layers:
        index, spec = layer.index, layer.spec
        live = tuple(i for i, seq in enumerate(batch) if index < last or seq.kind != "segment")
        plan: dict[int, dict[tuple, list[int]]] = {}  # shard -> item key -> positions in `live`
        choosers: dict[tuple, int] = {}
        owners: dict[tuple, tuple[int, int]] = {}  # (shard, item key) -> (segment's shard, its place)
        for j, i in enumerate(live):
            seq, (a, b) = batch[i], spans[i]
            if not seq.segments:
                continue
            pos = pos_all[a:b]
            dynamic = False
            if seq.layer_shards[index] is None:
                ctx_summ = {s: m[index] for s, m in summaries.get(seq.context_id, {}).items()} \
                    if seq.top_shards is not None else None  # exact: every visible segment, no summaries
                fixed = choose_shards(seq.segments, None, pos, spec, seq.top_shards, ctx_summ, q_needed=False)
                if fixed is None:  # chosen from this layer's queries, at the layer
                    dynamic = True
                else:
                    seq.layer_shards[index] = fixed
            q_lo, q_hi = int(pos[0]), int(pos[-1])
            chunks = set((pos // spec.chunk_size).tolist()) if spec.chunk_size else None
            by_shard = {s.shard: (i, s) for i, s in enumerate(seq.segments)}
            candidates = [s.shard for s in seq.segments] if dynamic else seq.layer_shards[index]
            # requests choosing pages or shards get their own item; exact ones share one per context
            own = seq.top_pages is not None or dynamic
            key = (seq.context_id, seq.top_pages, seq.request_id if own else None)
            for shard in candidates:
                order, segment = by_shard[shard]
                if segment_visible(segment, q_lo, q_hi, chunks, spec):
                    host = serving.get(shard, shard)
                    k = key if host == shard else (alias(key[0], shard), *key[1:])
                    plan.setdefault(host, {}).setdefault(k, []).append(j)
                    owners[host, k] = shard, order
                    if dynamic:
                        choosers[k] = j
        # the layer's row layout: live sequences' spans, back to back
        offsets, n = [], 0
        for i in live:
            offsets.append(n)
            n += spans[i][1] - spans[i][0]
        attend = {}
        for shard, per_key in sorted(plan.items()):
            items = []
            for key, js in per_key.items():
                rows = np.concatenate([np.arange(offsets[j], offsets[j] + spans[live[j]][1] - spans[live[j]][0])
                                       for j in js])
                first = batch[live[js[0]]]
                q_pos = np.concatenate([pos_all[spans[live[j]][0]:spans[live[j]][1]] for j in js])
                owner, order = owners[shard, key]
                items.append(ItemPlan(key[0], rows, q_pos, {batch[live[j]].request_id: spans[live[j]][1] -
                                                            spans[live[j]][0] for j in js},
                                      first.top_pages, first.segment_files.get(owner), tuple(js), choosers.get(key),
                                      owner, order))
            attend[shard] = tuple(items)
        layers.append(LayerPlan(index, live, attend, bool(layer.is_moe and live), n * model.cfg.top_k))
    running = tuple(range(num_groups)) if running_groups is None else running_groups
    groups = running if any(lp.experts for lp in layers) else ()
    rows = max((sum(spans[i][1] - spans[i][0] for i in lp.live) for lp in layers), default=0)
    return StepPlan(tuple(layers), groups, rows)
