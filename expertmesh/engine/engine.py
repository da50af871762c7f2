"""The layer loop of one router step over a batch of sequences.

All sequences' new tokens run as one flat batch [T, H] through the model's own layers
(`DecoderLayer.forward`: the layer composition lives there, once). The engine supplies the two
places where the mesh differs from one process:
  attention: queries go to the context shards on each pathway (through the exchange) while the
    router attends over each sequence's own KV; the partials merge exactly with LSE;
  experts: (token row, expert) pairs go to the expert groups computing the experts (by the
    partition or the expert placement in force: expert_routing.py), while the router computes
    the shared expert; outputs combine by gate weight.
The step's plan (step_plan.py) is built before the first layer; the exchange (exchange.py,
collective.py) carries it and every per-layer tensor. Where one colocated worker holds every
shard and group, the step goes to it whole instead (whole_step.py, step_host.py): one round trip a step.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

from expertmesh.engine.config import ContextView, EngineConfig
from expertmesh.engine.exchange import Exchange
from expertmesh.engine.expert_placement import ExpertPlacement, Routes
from expertmesh.engine.expert_routing import ExpertRouting
from expertmesh.engine.pathway import choose_shards
from expertmesh.engine.ping_pong import PingPong, TakingTurns
from expertmesh.engine.sequence import Sequence
from expertmesh.engine.step_plan import StepPlan, build_plan
from expertmesh.engine.takeover import alias_of, serving_map
from expertmesh.engine.whole_step import WholeSteps
from expertmesh.errors import ContextNotFound, Unavailable
from expertmesh.model.attention import (
    batched_decode_attention,
    merge_partials,
    padded_decode_attention,
    partial_attention,
)
from expertmesh.model.kv_pool import KVPool, SeqKV
from expertmesh.model.transformer import MoETransformer

# Arrays from Ray's object store are read-only views; these modules only read them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


SMALL_STEP = 256  # tokens: below, the router's own compute runs on one thread
RESTART_WAIT_S = 30.0  # a step whose experts no running group holds waits this long for Ray to restart one
RESTART_POLL_S = 0.25
FOREIGN = "not in this mesh (a context stored by a mesh with more context shards)"  # such a shard's "state"


@dataclasses.dataclass
class _Step:
    """Per-step state: the sequences whose rows the current layer runs, their row spans and
    positions (narrowed at the last layer, where context segments drop out)."""

    plan: StepPlan
    exchange: Exchange  # this step's
    batch: list[Sequence]
    spans: list[tuple[int, int]]
    positions: torch.Tensor
    pooled: bool = False  # every sequence's own KV lives in the engine's pool (one write and read per layer)
    group_counts: list = dataclasses.field(default_factory=list)  # (batch, [B, groups] pairs) per MoE layer
    expert_counts: list = dataclasses.field(default_factory=list)  # (layer, [E] pairs per expert) per MoE layer
    host_counts: list = dataclasses.field(default_factory=list)  # (layer, [groups] pairs each computed) per MoE layer
    routes: Routes | None = None  # the expert placement this step routes by (None: the partition)


@dataclasses.dataclass(frozen=True)
class Recovery:
    """A recovery the engine made (a lost shard's segments served by another, a lost group's
    experts held by another, and their hand-back): the router counts and lists them."""

    kind: str  # shard_takeover, shard_back, group_takeover, group_back (the router adds step_retry, context_lost)
    detail: str
    time: float  # wall clock


class Engine(ExpertRouting, WholeSteps):
    def __init__(self, dense: MoETransformer, exchange: Exchange, partition: list[range], contexts: ContextView,
                 config: EngineConfig = EngineConfig()) -> None:
        """dense: the model without its experts; exchange: the data plane (exchange.py);
        partition: expert group -> its experts; contexts: what a step reads of the router's
        contexts (page summaries, tokens per shard, shards past the mesh's), never changed here."""
        self.model, self.cfg, self.exchange = dense, dense.cfg, exchange
        self.kv_pool = KVPool(dense.cfg.num_layers)  # requests' own KV (registration pieces keep their own)
        self.contexts, self.durable = contexts, config.durable
        self.serving: dict[int, int] = {}  # lost shard -> the shard standing in for it
        self.group_serving: dict[int, int] = {}  # lost expert group -> the group holding its experts too
        self._host_of = torch.arange(len(partition))  # expert group -> the group its rows go to
        self.adopted: set[tuple[int, str]] = set()  # (stand-in shard, alias) opened there
        self.threads = torch.get_num_threads()
        self.partition = partition
        self.micro_batches, self.micro_steps = config.micro_batches, 0  # steps run as two halves
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="expertmesh-micro") if self.micro_batches > 1 else None
        self.summaries = contexts.summaries  # context id -> shard -> [layer] (kmin, kmax), read-only
        self.waits: collections.Counter = collections.Counter()  # seconds awaiting shards / groups
        # tokens routed to each expert, per layer, since the engine started (expert load; group_load)
        self.expert_load = torch.zeros(self.cfg.num_layers, max(self.cfg.num_experts, 1), dtype=torch.long)
        self.events: collections.deque[Recovery] = collections.deque(maxlen=256)  # the router drains them
        bounds = torch.tensor([r.stop for r in partition])
        self._group_of = lambda experts: torch.bucketize(experts, bounds, right=True)  # noqa: E731
        # where experts are computed (expert_placement.py): None routes by the partition
        self.placement: ExpertPlacement | None = None
        self.removed: set[int] = set()  # expert groups taken out of the mesh (remove_groups)
        self._routes: tuple[tuple, Routes] | None = None  # the placement over the groups running now
        self._turn = 0  # a replicated expert's next group
        self._placing = threading.Condition()
        self._in_flight: collections.Counter = collections.Counter()  # steps running, per placement version
        # rows each expert group computed, per layer, since the engine started (group_load)
        self.group_rows = torch.zeros(self.cfg.num_layers, max(len(partition), 1), dtype=torch.long)
        self.whole_steps, self.whole_steps_run = config.whole_steps, 0  # steps sent whole (whole_step.py)
        self._remote: dict = {}  # request id -> its sequence (weak), whose own KV lives at the worker

    def forward(self, batch: list[Sequence]) -> list[torch.Tensor | None]:
        """Run the new tokens of every sequence; return the logits rows each sequence needs."""
        if self._whole_ok(batch):  # one round trip to the worker holding everything
            return self._run_whole(batch)
        self._localize(batch)
        halves = self._split(batch)
        inputs = []  # per micro-batch: token ids, row spans, positions
        for part in halves:
            ids, pos, spans = [], [], []
            for seq in part:
                t_ids, t_pos = seq.new_tokens()
                spans.append((len(ids), len(ids) + len(t_ids)))
                ids.extend(t_ids)
                pos.append(t_pos)
            inputs.append((ids, spans, torch.cat(pos)))
        # small steps (decode) on one thread: spare cores serve the shards and groups waiting
        # in this step, where an idle thread pool would spin against them
        torch.set_num_threads(1 if sum(len(i[0]) for i in inputs) < SMALL_STEP else self.threads)
        foreign = self.contexts.foreign_shards()
        if foreign:  # before the group forms: its actors check plans against the bound
            self.exchange.allow_segments(max(foreign) + 1)
        restarting_until = time.monotonic() + RESTART_WAIT_S
        while True:
            for fresh in (False, True):  # what the exchange last heard, then (a shard this step needs) Ray now
                absent, absent_groups = self.exchange.absent(fresh=fresh)
                absent.update({k: FOREIGN for k in foreign})
                self._stand_in(absent)
                self._stand_in_experts(absent_groups)
                running = tuple(g for g in range(len(self.partition)) if g not in absent_groups and g not in self.removed)
                plans = [build_plan(part, spans, positions, self.model, self.summaries, len(self.partition),
                                    self.serving, running) for part, (_, spans, positions) in zip(halves, inputs)]
                lost = sorted({s for plan in plans for lp in plan.layers for s in lp.attend if s in absent})
                if not lost or set(lost) <= {k for k, v in absent.items() if v == FOREIGN}:
                    break
            # no running group to hold the experts of lost ones (the only group restarting): wait
            # for Ray to bring one back, bounded; a step never runs without its experts
            no_experts = any(lp.experts for plan in plans for lp in plan.layers) and \
                len(self.group_serving) < len([g for g in absent_groups if len(self.partition[g])])
            if not no_experts or time.monotonic() >= restarting_until:
                break
            time.sleep(RESTART_POLL_S)
        if lost:  # without a store its segments died with it (the router drops their contexts)
            error = Unavailable if self.durable else ContextNotFound
            raise error(f"context shard {lost[0]} is not running (Ray reports its actor {absent[lost[0]]}) and no "
                        f"other shard can serve its segments ({'no shard is running' if self.durable else 'the mesh has no store'})")
        if no_experts:
            raise Unavailable(f"expert groups {sorted(absent_groups)} are not running (Ray reports "
                              f"{sorted(set(absent_groups.values()))}) and no expert group is; retry later")
        if self.serving:
            self.adopted.update((h, it.context_id) for plan in plans for lp in plan.layers
                                for h, items in lp.attend.items() for it in items if h != it.owner)
        device = self.model.embed.weight.device
        with self._placing:  # one placement throughout the step (set_placement waits for it)
            placed = self._routes_over(absent_groups)
            version = placed.version if placed is not None else 0
            self._in_flight[version] += 1
        try:
            return self._run(batch, halves, inputs, plans, placed, device)
        finally:
            with self._placing:
                self._in_flight[version] -= 1
                self._placing.notify_all()

    def _run(self, batch, halves, inputs, plans, placed: Routes | None, device) -> list[torch.Tensor | None]:
        exchanges = self.exchange.begin_micro(plans) if len(plans) > 1 else [self.exchange.begin(plans[0])]
        steps = [_Step(plan, ex, list(part), spans, positions.to(device),
                       all(isinstance(s.kv, SeqKV) and s.kv.pool is self.kv_pool for s in part), routes=placed)
                 for plan, ex, part, (_, spans, positions) in zip(plans, exchanges, halves, inputs)]
        try:
            if len(steps) == 1:
                xs = [self._layers(steps[0], inputs[0][0])]
            else:  # ping-pong: one half computes while the other's rows are away
                self.micro_steps += 1
                turns = PingPong(len(steps))
                for i, step in enumerate(steps):
                    step.exchange = TakingTurns(step.exchange, turns, i)
                xs = turns.run(self._pool, [functools.partial(self._layers, step, ids)
                                            for step, (ids, _, _) in zip(steps, inputs)])
            reads = [ex.end() for ex in exchanges]
        except BaseException as exc:
            better = exchanges[0].abort(exc)  # the actors' own error says more than a broken pipe
            if better is not exc:
                raise better from exc
            raise
        out: dict[int, torch.Tensor] = {}
        for part, plan, step, r, x in zip(halves, plans, steps, reads, xs):
            self._account(part, plan, r)
            self._count_groups(step)
            for index, counts in step.expert_counts:
                self.expert_load[index] += counts
            for index, counts in step.host_counts:
                self.group_rows[index, :len(counts)] += counts
            out.update(self._logits(part, step, x))
        return [out.get(id(seq)) for seq in batch]

    def _split(self, batch: list[Sequence]) -> list[list[Sequence]]:
        """The step's micro-batches: two halves of about as many tokens each (requests' own
        steps only: a registration's pieces run whole), or the batch as one."""
        if self.micro_batches < 2 or len(batch) < 2 or any(seq.kind == "segment" for seq in batch):
            return [batch]
        sizes = [len(seq.token_ids) - seq.num_computed for seq in batch]
        total, run = sum(sizes), 0
        for cut, n in enumerate(sizes[:-1], start=1):
            run += n
            if run * 2 >= total:
                break
        return [batch[:cut], batch[cut:]]

    def _layers(self, step: _Step, ids: list[int]) -> torch.Tensor:
        """The layer loop of one (micro-)batch: its hidden states after the last layer."""
        x = self.model.embed(torch.tensor(ids, device=step.positions.device))  # [T, H]
        for layer in self.model.layers:
            x, _, _ = layer(x, step.positions, lambda lyr, q, k, v: self._attention(step, lyr, q, k, v),
                            lambda lyr, rows, experts: self._dispatch(step, lyr, rows, experts))
        return x

    def _logits(self, batch: list[Sequence], step: _Step, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """The logits rows each sequence needs (by id), after its step."""
        by_seq = {id(seq): span for seq, span in zip(step.batch, step.spans)}
        out: dict[int, torch.Tensor] = {}
        last = []  # sampled sequences: their last rows' logits in one LM-head call
        for seq in batch:
            seq.num_computed = len(seq.token_ids)
            span = by_seq.get(id(seq))
            if span is None or seq.kind == "segment":
                continue
            if seq.kind == "logits" or seq.wants_prompt_rows:  # every row (prompt log-probabilities: the prefill's)
                out[id(seq)] = self.model.logits(x[span[0]:span[1]]).cpu()
            else:
                last.append((id(seq), span[1] - 1))
        if last:
            rows = self.model.logits(x[torch.tensor([r for _, r in last], device=x.device)]).cpu()
            for (key, _), row in zip(last, rows):
                out[key] = row
        return out

    # -- attention ------------------------------------------------------------------------
    def _attention(self, step: _Step, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Attention of the layer's new queries: context shards (via the exchange) + each
        sequence's own KV (here), merged. Returns (attn [T', Hq, D], lse [T', Hq], kept rows or None)."""
        index = layer.index
        if step.pooled:  # every request's new rows in one write
            self.kv_pool.append(index, [s.kv for s in step.batch], [b - a for a, b in step.spans], k, v,
                                step.positions)
        else:
            for seq, (a, b) in zip(step.batch, step.spans):
                seq.kv.append(index, k[a:b], v[a:b], step.positions[a:b])
        lp = step.plan.layers[index]
        kept = None
        if len(lp.live) < len(step.batch):  # context segments need only this layer's K/V
            kept = (torch.cat([torch.arange(*step.spans[i]) for i in lp.live]) if lp.live
                    else torch.zeros(0, dtype=torch.long)).to(q.device)
            step.batch = [step.batch[i] for i in lp.live]
            starts = [0]
            for i in lp.live:
                starts.append(starts[-1] + step.spans[i][1] - step.spans[i][0])
            step.spans = list(zip(starts, starts[1:]))
            q, step.positions = q[kept], step.positions[kept]
        requests: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for shard, items in lp.attend.items():
            for j, item in enumerate(items):
                if item.chooser is not None and not self._chosen(step, layer, item.chooser, q, item.owner):
                    continue
                whole = len(item.rows) == q.shape[0]  # rows are sorted and distinct: all of them, in order
                requests.setdefault(shard, []).append((j, q if whole else q[torch.from_numpy(item.rows).to(q.device)]))
        replies = step.exchange.attend(index, requests)
        own_out, own_lse = self._own_attention(step, layer, q)  # while the shards work
        t0 = time.perf_counter()
        results = replies()
        self.waits["shards"] += time.perf_counter() - t0
        parts = [(own_out, own_lse)]
        by_place: dict[int, list] = {}  # one partial per segment place in a context, merged in context order
        for shard, answers in results.items():  # (wherever a segment lives: moved, or a stand-in serving two)
            for (j, _), (o, l) in zip(requests.get(shard, []), answers):  # a shard not chosen: none
                by_place.setdefault(lp.attend[shard][j].order, []).append((lp.attend[shard][j].rows, o, l))
        for place in sorted(by_place):  # rows without a segment at this place stay neutral (lse = -inf)
            got = by_place[place]
            if len(got) == 1 and len(got[0][0]) == q.shape[0]:
                parts.append((got[0][1].to(own_out.device), got[0][2].to(own_lse.device)))
                continue
            out, lse = torch.zeros_like(own_out), torch.full_like(own_lse, float("-inf"))
            for rows, o, l in got:
                rows = torch.from_numpy(rows).to(out.device)
                out[rows], lse[rows] = o.to(out.device), l.to(lse.device)
            parts.append((out, lse))
        out, lse = merge_partials(parts)
        return out.to(q.dtype), lse, kept  # [T, Hq, D], [T, Hq]

    def _chosen(self, step: _Step, layer, j: int, q: torch.Tensor, shard: int) -> bool:
        """A request choosing its shards from this layer's queries: is `shard` among them?"""
        seq, (a, b) = step.batch[j], step.spans[j]
        index = layer.index
        if seq.layer_shards[index] is None:
            seq.layer_shards[index] = choose_shards(
                seq.segments, q[a:b], step.positions[a:b], layer.spec, seq.top_shards,
                {s: m[index] for s, m in self.summaries.get(seq.context_id, {}).items()})
        return shard in seq.layer_shards[index]

    def _own_attention(self, step: _Step, layer, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sequence's queries over its own tokens: out [T, Hq, D], lse [T, Hq]."""
        index, spans = layer.index, step.spans
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
        decode = [i for i, (a, b) in enumerate(spans) if b - a == 1]
        if len(decode) > 1:  # one padded batch for all single-token steps
            rows = torch.tensor([spans[i][0] for i in decode], device=q.device)
            seqs = [step.batch[i] for i in decode]
            if step.pooled:  # one gather from the pool
                k, v, kpos = self.kv_pool.padded(index, [s.kv for s in seqs])
                o, l = padded_decode_attention(q[rows], step.positions[rows], k, v, kpos, layer.spec)
            else:
                cache = [s.kv.get(index) for s in seqs]
                o, l = batched_decode_attention(q[rows], step.positions[rows], [c[0] for c in cache],
                                                [c[1] for c in cache], [c[2] for c in cache], layer.spec)
            out[rows], lse[rows] = o, l
        for i, (seq, (a, b)) in enumerate(zip(step.batch, spans)):
            if len(decode) > 1 and b - a == 1:
                continue
            k, v, kpos = seq.kv.get(index)
            out[a:b], lse[a:b] = partial_attention(q[a:b], step.positions[a:b], k, v, kpos, layer.spec)
        return out, lse

    def _account(self, batch: list[Sequence], plan: StepPlan, reads: list) -> None:
        """Pages read per shard and tier, and shards visited, onto the requests."""
        for layer, shard, j, r in reads:
            lp = plan.layers[layer]
            owner = lp.attend[shard][j].owner  # pathways name the segments' shards, whoever served them
            for s in lp.attend[shard][j].seqs:
                seq = batch[lp.live[s]]
                seq.pathway_visits.add(owner)
                seq.page_reads.setdefault(owner, collections.Counter()).update(r)

    # -- lost shards ----------------------------------------------------------------------
    def _stand_in(self, absent: dict[int, str]) -> None:
        """Who serves the segments of shards Ray does not report alive (with a store); aliases on
        shards no longer standing in are dropped there (the owner is back, or another took over)."""
        serving = {}  # the load is counted only while a shard is lost (not on every step)
        if self.durable and absent:
            load = self.contexts.shard_tokens()
            n = max(len(load), max(absent) + 1)  # with the shards only a bigger mesh has
            serving = serving_map(n, absent, load + [0] * (n - len(load)))
        if serving != self.serving:
            self._changed("shard", self.serving, serving, "segments")
            for host, name in list(self.adopted):
                _, owner = alias_of(name)
                if serving.get(owner) != host:
                    self.exchange.release(host, name)
                    self.adopted.discard((host, name))
            self.serving = serving

    def _changed(self, role: str, before: dict[int, int], after: dict[int, int], what: str) -> None:
        now = time.time()
        for lost, host in after.items():
            if before.get(lost) != host:
                self.events.append(Recovery(f"{role}_takeover", f"{role} {host} serves lost {role} {lost}'s {what}", now))
        for lost, host in before.items():
            if lost not in after:
                self.events.append(Recovery(f"{role}_back", f"{role} {lost} serves its {what} again ({role} {host} "
                                                            f"stood in)", now))

    def forget(self, context_id: str) -> list[tuple[int, str]]:
        """The (stand-in shard, alias) pairs of a context being dropped; no longer tracked."""
        gone = [(h, a) for h, a in self.adopted if alias_of(a)[0] == context_id]
        self.adopted.difference_update(gone)
        return gone

    def close(self) -> None:
        self.exchange.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
