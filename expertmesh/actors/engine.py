"""The layer loop of one router step over a batch of sequences.

All sequences' new tokens run as one flat batch [T, H]. Per layer:
  dense q/k/v (router) -> fan q out to the context shards on each pathway, attend over each
  sequence's own KV meanwhile, merge with LSE -> o_proj -> gate -> fan token rows out to the
  expert groups holding their experts, shared expert meanwhile -> combine.
One fan-out to the shards and one to the expert groups per layer, whatever the batch size.

Shards and groups are Ray actor handles or in-process objects (same methods). The two fan-outs
go through a `FanOut`: plain calls, or one Ray Compiled Graph execution per fan-out
(`CompiledFanOut`, opt-in: less Ray overhead per layer).
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any, Awaitable

import warnings

import numpy as np
import ray
import torch

from expertmesh.actors.context_shard import AttendItem
from expertmesh.actors.pathway import choose_shards, segment_visible
from expertmesh.actors.sequence import Sequence
from expertmesh.model.attention import batched_decode_attention, merge_partials, partial_attention
from expertmesh.model.moe import dispatch_pairs
from expertmesh.model.transformer import MoETransformer


def call(target: Any, method: str, *args: Any) -> Awaitable:
    """Invoke a method of an actor handle (remote) or a local object, as an awaitable."""
    if isinstance(target, ray.actor.ActorHandle):
        return getattr(target, method).remote(*args)
    fut = asyncio.get_running_loop().create_future()
    try:
        fut.set_result(getattr(target, method)(*args))
    except Exception as exc:  # noqa: BLE001 - delivered to the awaiting caller
        fut.set_exception(exc)
    return fut


class FanOut:
    """One per-layer fan-out: a request (method args) to some of the targets, replies in order.

    `send` submits at once and returns an awaitable of the replies, so the caller can compute
    while the targets work. Targets are Ray actor handles or in-process objects.
    """

    def __init__(self, targets: list[Any], method: str) -> None:
        self.targets, self.method = targets, method

    async def send(self, requests: dict[int, tuple]) -> Awaitable[list]:
        return asyncio.gather(*(call(self.targets[i], self.method, *args) for i, args in requests.items()))

    def close(self) -> None:
        pass


class CompiledFanOut(FanOut):
    """The same over one Ray Compiled Graph of `<method>_cg(payload)` on all the targets.

    Every execution gives each target one payload (its args as a plain tuple; `()` for a
    target not asked, which returns at once). Built lazily in the running event loop (only the
    compiling process may execute). Replies are zero-copy views into channel buffers: copied
    here and released at once, since a held view blocks later executions.
    """

    def __init__(self, targets: list[Any], method: str, encode=lambda *args: args) -> None:
        super().__init__(targets, method)
        self.encode, self._dag = encode, None

    async def send(self, requests: dict[int, tuple]) -> Awaitable[list]:
        if not requests:
            return asyncio.gather()
        if self._dag is None:
            from ray.dag import InputNode, MultiOutputNode

            with InputNode() as inp:
                dag = MultiOutputNode([getattr(t, f"{self.method}_cg").bind(inp[i])
                                       for i, t in enumerate(self.targets)])
            self._dag = dag.experimental_compile(enable_asyncio=True)
        payloads = [self.encode(*requests[i]) if i in requests else () for i in range(len(self.targets))]
        futures = await self._dag.execute_async(*payloads)
        return self._replies(futures, list(requests))

    @staticmethod
    async def _replies(futures: list, asked: list[int]) -> list:
        done = await asyncio.gather(*futures, return_exceptions=True)  # await all: none left cached
        for res in done:
            if isinstance(res, BaseException):
                raise res
        return [_owned(done[i]) for i in asked]

    def close(self) -> None:
        if self._dag is not None:
            dag, self._dag = self._dag, None
            dag.teardown()


def _owned(x: Any) -> Any:
    """A reply with every numpy array copied out of the channel buffer."""
    if isinstance(x, np.ndarray):
        return np.array(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_owned(v) for v in x)
    return x


def _attend_payload(layer: int, items: list[AttendItem]) -> tuple:
    return layer, tuple((it.context_id, it.q, it.q_pos, it.visits, it.top_pages, it.segment) for it in items)


def fan_outs(shards: list[Any], groups: list[Any], compiled_graphs: bool) -> tuple[FanOut, FanOut]:
    """(to the context shards' `attend`, to the expert groups' `compute`)."""
    if not compiled_graphs:
        return FanOut(shards, "attend"), FanOut(groups, "compute")
    if not all(isinstance(t, ray.actor.ActorHandle) for t in shards + groups):
        raise ValueError("compiled graphs need Ray actor handles for all shards and groups")
    return CompiledFanOut(shards, "attend", _attend_payload), CompiledFanOut(groups, "compute")


def _drop_segments(batch: list[Sequence], spans, x: torch.Tensor, q: torch.Tensor, positions: torch.Tensor):
    """The batch without its context segments: (batch, spans, x, q, positions) re-indexed."""
    keep = [i for i, seq in enumerate(batch) if seq.kind != "segment"]
    if len(keep) == len(batch):
        return batch, spans, x, q, positions
    rows, new_spans, n = [], [], 0
    for i in keep:
        a, b = spans[i]
        rows.append(torch.arange(a, b))
        new_spans.append((n, n + b - a))
        n += b - a
    idx = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
    return [batch[i] for i in keep], new_spans, x[idx], q[idx], positions[idx]


# Arrays from Ray's object store are read-only views; these modules only read them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


class Engine:
    def __init__(self, dense: MoETransformer, shards: list[Any], groups: list[Any], partition: list[range],
                 summaries: dict[str, dict[int, list[tuple[torch.Tensor, torch.Tensor]]]],
                 compiled_graphs: bool = False) -> None:
        self.model, self.cfg = dense, dense.cfg
        self.shards, self.groups, self.partition = shards, groups, partition
        self.to_shards, self.to_groups = fan_outs(shards, groups, compiled_graphs)
        self.summaries = summaries  # context id -> shard -> [layer] (kmin, kmax)
        self.waits: collections.Counter = collections.Counter()  # seconds awaiting shards / groups
        bounds = torch.tensor([r.stop for r in partition])
        self._group_of = lambda experts: torch.bucketize(experts, bounds, right=True)  # noqa: E731

    async def forward(self, batch: list[Sequence]) -> list[torch.Tensor | None]:
        """Run the new tokens of every sequence; return logits rows each sequence needs."""
        ids, pos, spans = [], [], []
        for seq in batch:
            t_ids, t_pos = seq.new_tokens()
            spans.append((len(ids), len(ids) + len(t_ids)))
            ids.extend(t_ids)
            pos.append(t_pos)
        positions = torch.cat(pos)  # [T]
        everyone = list(batch)
        x = self.model.embed(torch.tensor(ids))  # [T, H]
        last = len(self.model.layers) - 1
        for index, layer in enumerate(self.model.layers):
            q, k, v = layer.qkv(layer.attn_norm(x), positions)  # [T, Hq, D], [T, Hkv, D]
            for seq, (a, b) in zip(batch, spans):
                seq.kv.append(index, k[a:b], v[a:b], positions[a:b])
            if index == last and any(seq.kind == "segment" for seq in batch):
                # a context segment needs only the last layer's K/V, never its output
                batch, spans, x, q, positions = _drop_segments(batch, spans, x, q, positions)
                if not batch:
                    break
            attn = await self._attend(index, layer, batch, spans, q, positions)
            x = layer.attn_out(x, attn)
            h = layer.mlp_norm(x)
            x = x + (await self._experts(index, layer, batch, spans, h) if layer.is_moe else layer.mlp(h))
        by_seq = {id(seq): (a, b) for seq, (a, b) in zip(batch, spans)}
        out: list[torch.Tensor | None] = []
        for seq in everyone:
            seq.num_computed = len(seq.token_ids)
            if id(seq) not in by_seq:
                out.append(None)
                continue
            a, b = by_seq[id(seq)]
            if seq.kind == "segment":
                out.append(None)
            elif seq.kind == "logits":
                out.append(self.model.logits(x[a:b]))
            else:
                out.append(self.model.logits(x[b - 1:b])[0])
        return out

    async def _attend(self, index: int, layer, batch: list[Sequence], spans, q: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
        """Attention of all new queries: context shards (remote) + own KV (here), merged."""
        plan: dict[int, dict[str, list[int]]] = {}  # shard -> context -> batch rows
        for i, (seq, (a, b)) in enumerate(zip(batch, spans)):
            if not seq.segments:
                continue
            if seq.layer_shards[index] is None:  # pathway is chosen during prefill, layer by layer
                seq.layer_shards[index] = choose_shards(
                    seq.segments, q[a:b], positions[a:b], layer.spec, seq.top_shards,
                    {s: m[index] for s, m in self.summaries.get(seq.context_id, {}).items()},
                )
            q_lo, q_hi = int(positions[a]), int(positions[b - 1])
            chunks = set((positions[a:b] // layer.spec.chunk_size).tolist()) if layer.spec.chunk_size else None
            by_shard = {s.shard: s for s in seq.segments}
            # requests choosing pages (top_pages) get their own item; exact ones share one per context
            key = (seq.context_id, seq.top_pages, seq.request_id if seq.top_pages else None)
            for shard in seq.layer_shards[index]:
                if segment_visible(by_shard[shard], q_lo, q_hi, chunks, layer.spec):
                    plan.setdefault(shard, {}).setdefault(key, []).append(i)
        requests, layout = {}, []
        for shard, per_ctx in plan.items():
            items = []
            for (ctx, top_pages, _), rows in per_ctx.items():
                idx = torch.cat([torch.arange(*spans[i]) for i in rows])
                items.append(AttendItem(ctx, q[idx].numpy(), positions[idx].numpy(),
                                        {batch[i].request_id: spans[i][1] - spans[i][0] for i in rows},
                                        top_pages, batch[rows[0]].segment_files.get(shard)))
                layout.append((shard, rows, idx))
            requests[shard] = (index, items)
        replies = await self.to_shards.send(requests)
        own_out, own_lse = self._own_attention(index, layer, batch, spans, q, positions)  # while shards work
        t0 = time.perf_counter()
        results = [r for res in await replies for r in res]
        self.waits["shards"] += time.perf_counter() - t0
        parts = [(own_out, own_lse)]
        per_shard: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for (shard, rows, idx), (o, lse, reads) in zip(layout, results):
            if shard not in per_shard:  # rows a shard did not serve stay neutral (lse = -inf)
                per_shard[shard] = (torch.zeros_like(own_out), torch.full_like(own_lse, float("-inf")))
                parts.append(per_shard[shard])
            per_shard[shard][0][idx] = torch.from_numpy(np.array(o))
            per_shard[shard][1][idx] = torch.from_numpy(np.array(lse))
            for i in rows:
                batch[i].pathway_visits.add(shard)
                batch[i].page_reads.setdefault(shard, collections.Counter()).update(reads)
        return merge_partials(parts)[0].to(q.dtype)  # [T, Hq, D]

    def _own_attention(self, index: int, layer, batch: list[Sequence], spans, q: torch.Tensor,
                       positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sequence's queries over its own tokens: out [T, Hq, D], lse [T, Hq]."""
        out = torch.empty(q.shape, dtype=torch.float32)
        lse = torch.empty(q.shape[:2], dtype=torch.float32)
        decode = [i for i, (a, b) in enumerate(spans) if b - a == 1]
        if len(decode) > 1:  # one padded batch for all single-token steps
            rows = torch.tensor([spans[i][0] for i in decode])
            cache = [batch[i].kv.get(index) for i in decode]
            o, l = batched_decode_attention(q[rows], positions[rows], [c[0] for c in cache],
                                            [c[1] for c in cache], [c[2] for c in cache], layer.spec)
            out[rows], lse[rows] = o, l
        for i, (seq, (a, b)) in enumerate(zip(batch, spans)):
            if len(decode) > 1 and b - a == 1:
                continue
            k, v, kpos = seq.kv.get(index)
            out[a:b], lse[a:b] = partial_attention(q[a:b], positions[a:b], k, v, kpos, layer.spec)
        return out, lse

    async def _experts(self, index: int, layer, batch: list[Sequence], spans, h: torch.Tensor) -> torch.Tensor:
        """MoE feed-forward: gate here, experts in their groups, combine by gate weight."""
        _, experts, weights = layer.gate_route(h)  # [T, k]
        token, expert, in_scale, out_w = dispatch_pairs(experts, weights, self.cfg)  # [P]
        group = self._group_of(expert)  # [P]
        rows = h[token] * in_scale[:, None].to(h.dtype)  # [P, H]
        requests, picks = {}, []
        for g in torch.unique(group).tolist():
            pick = (group == g).nonzero().squeeze(1)
            requests[g] = (index, rows[pick].numpy(), expert[pick].numpy())
            picks.append(pick)
        replies = await self.to_groups.send(requests)
        shared = layer.shared(h)  # while the groups work
        seq_of_token = torch.cat([torch.full((b - a,), i) for i, (a, b) in enumerate(spans)])
        counts = np.zeros((len(batch), len(self.groups)), dtype=np.int64)
        np.add.at(counts, (seq_of_token[token].numpy(), group.numpy()), 1)
        for seq, row in zip(batch, counts):
            seq.group_tokens.update({g: int(n) for g, n in enumerate(row) if n})
        y_pairs = torch.empty_like(rows)
        t0 = time.perf_counter()
        done = await replies
        self.waits["expert_groups"] += time.perf_counter() - t0
        for pick, res in zip(picks, done):
            y_pairs[pick] = torch.from_numpy(res)
        y = torch.zeros_like(h).index_add_(0, token, y_pairs * out_w[:, None].to(h.dtype))
        return y if shared is None else y + shared

    def close(self) -> None:
        """Tear down the compiled graphs (before the actors are killed)."""
        self.to_shards.close()
        self.to_groups.close()
