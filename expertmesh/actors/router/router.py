"""Router: registers contexts over the shards and runs requests in shared batches.

The step loop reads like the work it does: admit, run the layers (attend over each request's
pathway, route tokens to expert groups), sample, emit. Requests arriving while others decode
join at the next step. A bad request gets its own error; the actor and the batch live on.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import time
from typing import Any, AsyncIterator, Awaitable

import numpy as np
import ray
import torch

from expertmesh.actors.names import (
    CONTEXT_SHARD,
    EXPERT_GROUP,
    added,
    mesh_of,
    own_name,
    present,
)
from expertmesh.actors.router.contexts import Contexts
from expertmesh.actors.router.directory import Directory
from expertmesh.actors.router.experts import Experts
from expertmesh.actors.router.long_poll import Snapshot
from expertmesh.actors.router.new_sequence import new_sequence
from expertmesh.actors.router.next_token import next_token
from expertmesh.actors.router.placement import Placement
from expertmesh.actors.router.registration import Registration, check_tokens
from expertmesh.actors.router.reports import Reports
from expertmesh.actors.router.retire import Retiring
from expertmesh.actors.router.router_metrics import FLUSH_S, RouterMetrics
from expertmesh.actors.router.shards import Shards
from expertmesh.dataplane.collective import CollectiveExchange
from expertmesh.dataplane.task import TaskExchange
from expertmesh.engine.config import EngineConfig
from expertmesh.engine.engine import Engine, Recovery
from expertmesh.engine.request import Chunk, Request, Result
from expertmesh.engine.scheduler import Scheduler
from expertmesh.engine.sequence import Sequence
from expertmesh.errors import (
    ContextNotFound,
    DataPlaneError,
    DeadlineExceeded,
    Unavailable,
)
from expertmesh.mesh_spec import MeshSpec
from expertmesh.model.checkpoint import load_model
from expertmesh.model.device import cuda_memory, resolve_device, resolve_dtype
from expertmesh.model.grammar import Grammars
from expertmesh.model.moe import expert_partition
from expertmesh.model.tokenizer import load_tokenizer
from expertmesh.store.catalog import Catalog
from expertmesh.store.fingerprint import model_fingerprint
from expertmesh.store.registry import ContextInfo, ContextRecord


class Router:
    """The router actor: one owner of the contexts (contexts.py) handed to its collaborators:
    registration (registration.py), the directory (directory.py), placement (placement.py) and
    the letting go of segments (retire.py); the step engine (engine/engine.py) reads the
    contexts through a narrow view. The actor methods below delegate to them."""

    def __init__(self, spec: MeshSpec, shards: list[Any], groups: list[Any], fingerprint: str | None = None,
                 num_threads: int | None = None) -> None:
        """spec: the mesh (mesh_spec.py) with its checkpoint resolved to a local path; shards and
        groups: actor names (names.actor_name), or in-process objects (called directly).
        data_plane "collective": per-layer tensors point to point between the router and the
        actors, no Ray call per step or layer, steps one at a time; "ray": a Ray task per actor
        per layer, `lanes` step loops overlapping. A store's contexts are listed at once."""
        # the router runs every dense layer of every step: all of its host's cores by default
        torch.set_num_threads(num_threads or os.cpu_count() or 1)
        self.spec = spec
        checkpoint, store = spec.checkpoint, spec.store
        self.checkpoint = checkpoint
        self.device = resolve_device(spec.device)
        self.dtype = resolve_dtype(spec.dtype, self.device)
        self.model = load_model(checkpoint, with_experts=False, dtype=self.dtype,
                                device=self.device).requires_grad_(False)
        self.cfg = self.model.cfg
        self.grammars: Grammars | None = None
        # names (names.actor_name), and the shards added to the mesh since it started (`add_shards`)
        self.shards = Shards(present(shards + added(CONTEXT_SHARD, own_name(), len(shards))))  # None: taken out
        # the groups it was started with, those added since (`add_groups`); None: taken out again
        first_groups = len(groups)
        groups = present(groups + added(EXPERT_GROUP, own_name(), len(groups)))
        shards = self.shards.handles
        self.catalog: Catalog | None = None
        if store is not None:  # this router's member lease names its mesh (store/members.py)
            self.catalog = Catalog.open(store, fingerprint or model_fingerprint(checkpoint),
                                        {"architecture": self.cfg.architecture, "checkpoint": str(checkpoint)},
                                        group=mesh_of(own_name()))
        self.partition = expert_partition(self.cfg.num_experts, first_groups) if any(self.cfg.moe_layers) else []
        self.partition += [range(self.cfg.num_experts, self.cfg.num_experts)] * (len(groups) - first_groups)
        self._by_id: dict[str, Sequence] = {}  # running requests, for cancel()
        remote = all(isinstance(t, ray.actor.ActorHandle) for t in shards + groups if t is not None)
        lanes = spec.lanes
        if remote and spec.data_plane == "collective":
            exchange = CollectiveExchange(shards, groups, self.cfg.num_heads, self.cfg.head_dim, self.cfg.hidden_size,
                                          self.cfg.num_layers, self.device, transport=spec.transport,
                                          router=own_name() or "", routers=spec.routers)
            lanes = 1  # one step at a time over the group
        else:
            exchange = TaskExchange(shards, groups, own_name() or "")
        self.data_plane = spec.data_plane if remote else "in-process"
        self.contexts = Contexts(self.shards)  # the one owner of the contexts, handed to each part below
        self.engine = Engine(self.model, exchange, self.partition, self.contexts,
                             EngineConfig(durable=self.catalog is not None, micro_batches=spec.micro_batches,
                                          whole_steps=spec.whole_steps))
        self.experts = Experts(self.engine, groups)  # groups added and taken out, the expert placement
        self.experts.adopt_newest()
        self.retiring = Retiring(self.shards, self.engine, self.catalog, lambda: list(self._by_id.values()))
        self.registration = Registration(self.cfg, spec, self.contexts, self.shards, self.catalog, self._run)
        self.directory = Directory(self.contexts, self.shards, self.catalog, self.retiring, own_name(), spec.routers)
        if self.directory.siblings:
            self.retiring.quiet = self.directory.quiet  # a drop fences every router's requests
        self.placement = Placement(self.contexts, self.shards, self.engine, self.catalog, self.retiring,
                                   self.directory)
        self.scheduler = Scheduler(max_batch_tokens=spec.max_batch_tokens, lanes=lanes)
        self._wake: asyncio.Event | None = None
        self._loop_tasks: list[asyncio.Task] = []
        self._ids = itertools.count()
        self.steps = 0
        self.step_log: collections.deque = collections.deque(maxlen=4096)  # (seqs, tokens, seconds)
        self.metrics = RouterMetrics(own_name()) if own_name() else None  # Ray metrics: a router actor's only
        self.reports = Reports(self.engine, self.contexts, self.metrics)  # recoveries, expert load (reports.py)
        self.directory.load()  # a store's contexts listed at once (without one: what the shards hold)
        self.directory.start()  # an actor's constructor runs on its event loop: the directory follows from now on

    # -- public methods (Ray actor methods) -----------------------------------------------
    def describe(self) -> dict:
        """What a driver needs to attach to this mesh."""
        return {"checkpoint": self.checkpoint, "shards": [h for h in self.shards.handles if h is not None],
                "shard_slots": len(self.shards),
                "groups": [g for g in self.experts.groups if g is not None],
                "mesh": mesh_of(own_name())}

    def ping(self) -> dict:
        return {"architecture": self.cfg.architecture, "vocab_size": self.cfg.vocab_size,
                "num_layers": self.cfg.num_layers, "eos_token_id": list(self.cfg.eos_token_id)}

    async def register_context(self, token_ids: list[int], mode: str = "exact", shards: int | None = None,
                               context_id: str | None = None, owner: str = "default",
                               visibility: str = "private", name: str | None = None,
                               chat: str | None = None) -> ContextInfo:
        """Compute a context's KV onto the shards (registration.py); every router of the mesh
        lists and serves it once this returns."""
        info = await self.registration.register(token_ids, mode, shards, context_id, owner, visibility, name, chat)
        await self.directory.spread()
        return info

    def registration_progress(self, context_id: str) -> dict | None:
        """How far this router's registration of `context_id` is (registration.Progress.view:
        tokens_done, num_tokens, tokens_per_s, eta_s, state, error); None: not registered here."""
        p = self.registration.progress.get(context_id)
        return None if p is None else p.view()

    async def drop_context(self, context_id: str) -> None:
        """Refused here at once, by every router of the mesh once this returns, by every mesh on
        the store at its next read; the segments go once no request reads them, on any router of
        the mesh (requests running over it when it was dropped finish, store or not)."""
        self._record(context_id)
        record = self.contexts.drop(context_id, f"context {context_id!r} was dropped",
                                    told=f"context {context_id!r} was dropped (through another router)")
        if self.catalog is not None:  # tombstone + manifest first: gone for every mesh even if a delete fails
            self.catalog.withdraw(context_id)
        await self.directory.spread()
        await self.retiring.dropped(record)  # with other routers: once their requests over it end too

    def running_over(self, context_id: str) -> int:
        """Requests this router runs (admitted, running or streaming) over a context."""
        return sum(1 for seq in list(self._by_id.values()) if seq.context_id == context_id)

    def list_contexts(self) -> list[ContextInfo]:
        return self.directory.listing()

    def get_context(self, context_id: str) -> ContextInfo:
        return self._record(context_id).info

    async def forward_logits(self, request: Request) -> np.ndarray:
        """Logits [len(prompt_ids), vocab] as if context + prompt were one sequence (the request's
        sampling options are not used)."""
        await self._prepare(request.context_id)
        seq = self._sequence("logits", request)
        await self._in_time(seq, asyncio.ensure_future(self._run(seq)))
        return torch.cat([torch.as_tensor(x) for x in seq.logits]).cpu().numpy()

    async def generate(self, request: Request) -> Result:
        await self._prepare(request.context_id)
        seq = self._sequence("generate", request)
        await self._in_time(seq, asyncio.ensure_future(self._run(seq)))
        return seq.result()

    async def stream(self, request: Request) -> AsyncIterator[Chunk | Result]:
        """Yield a Chunk of tokens as they are generated (several when the reader lags), then the
        Result."""
        await self._prepare(request.context_id)
        seq = self._sequence("generate", request)
        seq.stream = asyncio.Queue()
        self._by_id[seq.request_id] = seq  # before _run starts: a segment move waits for it (placement.py)
        task = asyncio.ensure_future(self._run(seq))
        finished, sent_lp = False, 0
        while not finished:
            tokens = [await self._in_time(seq, task, seq.stream.get())]
            while not seq.stream.empty():  # coalesce what arrived meanwhile: fewer hops under load
                tokens.append(seq.stream.get_nowait())
            finished = tokens[-1] is None
            tokens = [t for t in tokens if t is not None]
            if tokens:
                lps = None
                if seq.params.logprobs is not None:
                    lps, sent_lp = tuple(seq.logprobs[sent_lp:sent_lp + len(tokens)]), sent_lp + len(tokens)
                yield Chunk(tuple(tokens), lps)
        await task
        yield seq.result()

    async def _in_time(self, seq: Sequence, task: asyncio.Future, waiting: Awaitable | None = None) -> Any:
        """Await `waiting` (by default `task`, the sequence's run) within the sequence's deadline.
        Past it the request leaves the batch (at once when it waits for a step, after its step
        when one is running) and its caller gets DeadlineExceeded from here."""
        if seq.deadline is None:
            return await (task if waiting is None else waiting)
        fut = asyncio.ensure_future(asyncio.shield(task) if waiting is None else waiting)
        done, _ = await asyncio.wait({fut}, timeout=max(0.0, seq.deadline - time.time()))
        if fut in done:
            return fut.result()
        fut.cancel()  # the wait only (the run goes on until the request leaves the batch)
        # (the loop's clock may wake a hair before time.time() reaches the deadline: never "by -0.000 s")
        late, took = max(0.0, time.time() - seq.deadline), time.perf_counter() - seq.t_submit
        error = DeadlineExceeded(f"request {seq.request_id!r} missed its deadline by {late:.3f} s: {took:.3f} s after "
                                 f"it reached the router, {len(seq.output)} of {seq.params.max_new_tokens} tokens "
                                 "generated")
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # the caller has `error`: seen, unread
        if self.scheduler.discard(seq):  # waiting for a step: it leaves now
            self._finish(seq, error=error)
        else:  # inside a step: it ends after it
            seq.cancelled = True
        raise error

    def cancel(self, request_id: str) -> bool:
        """Stop a request after its current step (e.g. its client hit a stop string or left)."""
        seq = self._by_id.get(request_id)
        if seq is None:
            return False
        seq.cancelled = True
        return True

    async def close(self) -> None:
        """Leave the data plane's process group and the store's members; call before the actors are killed."""
        self.engine.close()
        self.directory.close()
        if self.catalog is not None:
            self.catalog.close()

    def step_times(self) -> list[tuple[int, int, float]]:
        """Recent steps as (sequences, new tokens, seconds)."""
        return list(self.step_log)

    def stats(self) -> dict:
        return {"steps": self.steps, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                **cuda_memory(self.device), "step_seconds": sum(s for _, _, s in self.step_log),
                "data_plane": self.data_plane, **self.engine.exchange.stats(),
                "wait_seconds": dict(self.engine.waits), "micro_batched_steps": self.engine.micro_steps,
                "whole_steps": self.engine.whole_steps_run,
                "waiting": len(self.scheduler.waiting),
                "running": len(self.scheduler.ready) + self.scheduler.in_flight, "contexts": len(self.contexts),
                "expert_load": self.reports.expert_load(), "recoveries": self.reports.events(),
                "expert_groups": self.experts.describe()}

    async def add_shards(self, names: list[str]) -> list[int]:
        """Context shards started for this mesh join it (placement.py); their indices."""
        return await self.placement.add_shards(names)

    async def pool(self) -> dict:
        groups = self.experts.describe()  # the expert groups in the mesh now, and the placement's version
        return await self.placement.pool() | {"expert_groups": groups["groups"] - len(groups["removed"]),
                                               "expert_placement_version": groups["placement_version"]}

    async def rebalance(self) -> dict:
        return await self.placement.rebalance()

    async def remove_shards(self, indices: list[int]) -> dict:
        return await self.placement.remove_shards(indices)

    async def forget_shards(self, indices: list[int]) -> None:
        await asyncio.to_thread(self.placement.forget_shards, indices)  # after a step in flight

    def expert_groups(self) -> dict:
        """describe() with the groups' handles (None: taken out) and the placement in force."""
        return self.experts.describe() | {"handles": list(self.experts.groups), "placement": self.engine.placement}

    def expert_load_table(self) -> np.ndarray:
        return self.experts.load()

    async def set_expert_placement(self, placement) -> bool:
        return await self.experts.set_placement(placement)

    async def add_groups(self, names: dict[int, str]) -> list[int]:
        return await self.experts.add_groups(names)

    async def remove_groups(self, groups: list[int]) -> None:
        await self.experts.remove_groups(groups)

    def clean_store(self) -> dict:
        return self.directory.clean_store()

    async def directory_changes(self, listener: str, held: tuple[str, int]) -> Snapshot:
        """What changed in this router's contexts since the snapshot `held` (long_poll.py),
        answered when there is something: the mesh's other routers follow it (directory.py)."""
        return await self.directory.changes(listener, held)

    # -- the step loop --------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            batch = self.scheduler.schedule()  # admit
            if self.metrics is not None:
                self.metrics.queue(len(self.scheduler.waiting), len(self.scheduler.ready) + self.scheduler.in_flight)
            if not batch:
                self._wake.clear()
                try:  # idle: the metrics still follow drops, registrations and recoveries
                    await asyncio.wait_for(self._wake.wait(), FLUSH_S)
                except asyncio.TimeoutError:
                    self.reports.observe()
                continue
            tokens, t0 = sum(len(s.token_ids) - s.num_computed for s in batch), time.perf_counter()
            try:
                # attend + route experts, layer by layer; in a thread: the actor keeps taking requests
                outs = await asyncio.to_thread(self.engine.forward, batch)
            except Exception as exc:  # noqa: BLE001 - fail or retry this batch's requests, keep serving
                self.scheduler.step_done(batch)
                await self._recover(batch, exc)
                continue
            self.scheduler.step_done(batch)
            self.steps += 1
            self.step_log.append((len(batch), tokens, time.perf_counter() - t0))
            if self.metrics is not None:
                self.metrics.stepped(self.step_log[-1][2])
            self.reports.observe()
            for seq, logits in zip(batch, outs):  # sample, emit
                self._postprocess(seq, logits)

    def _postprocess(self, seq: Sequence, logits: torch.Tensor | None) -> None:
        if seq.kind == "segment":
            return self._finish(seq)
        if seq.kind == "logits":
            seq.logits.append(logits.cpu().numpy())
            return self._finish(seq)
        reason = next_token(seq, logits, self.cfg)  # sample, emit (next_token.py)
        if reason is None:
            self.scheduler.keep_running(seq)
        else:
            self._finish(seq, reason=reason)

    def _finish(self, seq: Sequence, reason: str | None = None, error: BaseException | None = None) -> None:
        seq.finish_reason, seq.finished = reason, True
        if seq.stream is not None:
            seq.stream.put_nowait(None)
        if seq.done is not None and not seq.done.done():
            if error is not None:
                seq.done.set_exception(error)
            else:
                seq.done.set_result(None)

    async def _recover(self, batch: list[Sequence], exc: Exception) -> None:
        """A step failed. An actor that died under it (Ray restarts it) or a shard that restarted
        without a store (it lost its contexts) is recoverable: contexts the shards no longer hold
        are dropped and their requests fail with ContextNotFound; the rest run the step once more.
        Any other error fails the batch's requests."""
        recoverable = isinstance(exc, (ContextNotFound, ray.exceptions.RayActorError, DataPlaneError))
        lost = await self.directory.drop_lost() if recoverable else {}
        now = time.time()
        if recoverable:
            self.reports.recovered(Recovery("step_retry", f"a step of {len(batch)} requests failed "
                                                             f"({type(exc).__name__}) and runs again", now))
        for why in lost.values():
            self.reports.recovered(Recovery("context_lost", why, now))
        self.reports.observe(force=True)
        for seq in batch:
            if seq.context_id in lost:
                self._finish(seq, error=ContextNotFound(lost[seq.context_id]))
            elif recoverable and seq.retries == 0:
                seq.retries += 1
                seq.kv.truncate(seq.num_computed)  # forget the failed step's partial KV
                self.scheduler.add(seq)
                self._wake.set()
            elif isinstance(exc, (ray.exceptions.RayActorError, DataPlaneError)):
                self._finish(seq, error=Unavailable(f"a mesh actor failed twice under request {seq.request_id!r} "
                                                    f"({type(exc).__name__}); retry later"))
            else:
                self._finish(seq, error=exc)

    async def _run(self, seq: Sequence) -> None:
        """Queue a sequence for the step loop and wait until it finishes."""
        if not self._loop_tasks or any(t.done() for t in self._loop_tasks):
            for t in self._loop_tasks:
                t.cancel()
            self._wake = asyncio.Event()
            loop = asyncio.get_running_loop()
            self._loop_tasks = [loop.create_task(self._loop()) for _ in range(self.scheduler.lanes)]
        self.directory.start()  # (an in-process router's first request: its event loop runs from here)
        record = self.contexts.get(seq.context_id) if seq.kind != "segment" else None
        if record is not None:
            record.active += 1
        seq.done = asyncio.get_running_loop().create_future()
        self._by_id[seq.request_id] = seq
        self.scheduler.add(seq)
        self._wake.set()
        try:
            await seq.done
        finally:
            self._by_id.pop(seq.request_id, None)
            if record is not None:
                record.active -= 1
                if record.dropped and record.active == 0:
                    await self.retiring.dropped(record)

    # -- helpers --------------------------------------------------------------------------
    def _sequence(self, kind: str, request: Request) -> Sequence:
        """The router's state for a request, checked against this model (new_sequence.py)."""
        self._check_tokens(request.prompt_ids, "prompt")
        return new_sequence(kind, request, request.request_id or f"req-{next(self._ids)}", self.cfg, self._record,
                            self._grammars, self.engine.kv_pool)

    def _grammars(self) -> Grammars:
        """Structured output against this checkpoint's tokenizer (built at the first grammar)."""
        if self.grammars is None:
            self.grammars = Grammars(load_tokenizer(self.checkpoint, self.cfg.vocab_size), self.cfg.vocab_size,
                                     tuple(self.cfg.eos_token_id), self.cfg.bos_token_id)
        return self.grammars

    def _check_tokens(self, ids: list[int], what: str) -> None:
        check_tokens(ids, what, self.cfg.vocab_size)

    def _record(self, context_id: str) -> ContextRecord:
        """A ready context's record (directory.py), or ContextNotFound saying why not."""
        return self.directory.record(context_id)

    async def _prepare(self, context_id: str | None) -> None:
        """A stored context's shards open its files at its first use (registration.py)."""
        await self.registration.prepare(context_id)


RemoteRouter = ray.remote(Router)
