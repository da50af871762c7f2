"""Router: registers contexts over the shards and runs requests in shared batches.

The step loop reads like the work it does: admit, run the layers (attend over each request's
pathway, route tokens to expert groups), sample, emit. Requests arriving while others decode
join at the next step. A bad request gets its own error; the actor and the batch live on.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import math
import os
import time
from typing import Any, AsyncIterator, Awaitable

import numpy as np
import ray
import torch

from expertmesh.actors.names import added_shards, lookup, own_name
from expertmesh.actors.router.directory import Directory
from expertmesh.actors.router.placement import Placement
from expertmesh.actors.router.registration import Registration
from expertmesh.dataplane.calls import call
from expertmesh.dataplane.collective import CollectiveExchange
from expertmesh.dataplane.liveness import down
from expertmesh.dataplane.task import TaskExchange
from expertmesh.engine.engine import Engine
from expertmesh.engine.request import Chunk, Request, Result
from expertmesh.engine.scheduler import Scheduler
from expertmesh.engine.sequence import Sequence
from expertmesh.errors import ContextNotFound, DataPlaneError, DeadlineExceeded, Unavailable
from expertmesh.mesh_spec import MeshSpec
from expertmesh.model.checkpoint import load_model
from expertmesh.model.device import resolve_device, resolve_dtype
from expertmesh.model.moe import expert_partition
from expertmesh.model.sampling import SamplingParams, sample
from expertmesh.store.catalog import SYNC_S, Catalog
from expertmesh.store.fingerprint import model_fingerprint
from expertmesh.store.registry import ContextInfo, ContextRecord


class Router(Registration, Directory, Placement):
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
        checkpoint, store, page_size = spec.checkpoint, spec.store, spec.page_size
        self.checkpoint = checkpoint
        self.device = resolve_device(spec.device)
        self.dtype = resolve_dtype(spec.dtype, self.device)
        self.model = load_model(checkpoint, with_experts=False, dtype=self.dtype,
                                device=self.device).requires_grad_(False)
        self.cfg = self.model.cfg
        # names (names.actor_name), and the shards added to the mesh since it started (`add_shards`)
        self.shards, self.groups = lookup(shards + added_shards(own_name(), len(shards))), lookup(groups)
        shards, groups = self.shards, self.groups
        self.capacity_tokens = spec.shard_capacity_tokens
        self.kv_dtype, self.page_size = spec.kv_dtype, page_size
        unit = math.lcm(self.cfg.alignment, page_size)
        self.piece_tokens = max(unit, spec.max_batch_tokens // unit * unit)  # registration runs in pieces this long
        self.catalog: Catalog | None = None
        if store is not None:
            self.fingerprint = fingerprint or model_fingerprint(checkpoint)
            self.catalog = Catalog.open(store, self.fingerprint, {"architecture": self.cfg.architecture,
                                                                  "checkpoint": str(checkpoint)})
        self.partition = expert_partition(self.cfg.num_experts, len(groups)) if any(self.cfg.moe_layers) else []
        self.contexts: dict[str, ContextRecord] = {}
        self.lost: dict[str, str] = {}  # context id -> why it was lost (a shard restarted without a store)
        self._by_id: dict[str, Sequence] = {}  # running requests, for cancel()
        self._retiring: dict[str, set[int]] = {}  # context id -> shards letting go of a moved segment (placement.py)
        self._placing, self._letting_go = asyncio.Lock(), set()
        self._sibling_handles: list | None = None  # this mesh's other routers, once all are up (directory.py)
        remote = all(isinstance(t, ray.actor.ActorHandle) for t in shards + groups)
        lanes = spec.lanes
        if remote and spec.data_plane == "collective":
            exchange = CollectiveExchange(shards, groups, self.cfg.num_heads, self.cfg.head_dim, self.cfg.hidden_size,
                                          self.cfg.num_layers, self.device, transport=spec.transport,
                                          router=own_name() or "", routers=spec.routers)
            lanes = 1  # one step at a time over the group
        else:
            exchange = TaskExchange(shards, groups, own_name() or "")
        self.data_plane = spec.data_plane if remote else "in-process"
        self.engine = Engine(self.model, exchange, self.partition, {}, len(shards), self.catalog is not None,
                             self._used_tokens, spec.micro_batches)
        self.scheduler = Scheduler(max_batch_tokens=spec.max_batch_tokens, lanes=lanes)
        self._wake: asyncio.Event | None = None
        self._loop_tasks: list[asyncio.Task] = []
        self._directory_task: asyncio.Task | None = None
        self._ids = itertools.count()
        self.steps = 0
        self.step_log: collections.deque = collections.deque(maxlen=4096)  # (seqs, tokens, seconds)
        if self.catalog is not None:
            for m in self.catalog.manifests.values():
                self._adopt(m)
        else:
            self._adopt_from_shards()

    # -- public methods (Ray actor methods) -----------------------------------------------
    def describe(self) -> dict:
        """What a driver needs to attach to this mesh."""
        return {"checkpoint": self.checkpoint, "shards": self.shards, "groups": self.groups}

    def ping(self) -> dict:
        return {"architecture": self.cfg.architecture, "vocab_size": self.cfg.vocab_size,
                "num_layers": self.cfg.num_layers, "eos_token_id": list(self.cfg.eos_token_id)}

    async def drop_context(self, context_id: str) -> None:
        record = self._record(context_id)
        record.dropped = True
        del self.contexts[context_id]
        self._remember_lost({context_id: f"context {context_id!r} was dropped"})  # a racing directory sync skips it
        self.engine.summaries.pop(context_id, None)
        if self.catalog is not None:  # tombstone + manifest first: gone for every mesh even if a delete fails
            self.catalog.withdraw(context_id)
        await self._tell_elsewhere("forget_context", context_id)  # refused by the mesh's other routers on return
        if record.active == 0:
            await self._drop_segments(record)

    def list_contexts(self) -> list[ContextInfo]:
        self._sync_directory()
        self._adopt_registered_elsewhere()
        return [r.info for r in self.contexts.values() if r.ready]

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
        finished = False
        while not finished:
            tokens = [await self._in_time(seq, task, seq.stream.get())]
            while not seq.stream.empty():  # coalesce what arrived meanwhile: fewer hops under load
                tokens.append(seq.stream.get_nowait())
            finished = tokens[-1] is None
            tokens = [t for t in tokens if t is not None]
            if tokens:
                yield Chunk(tuple(tokens))
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
        late, took = time.time() - seq.deadline, time.perf_counter() - seq.t_submit
        error = DeadlineExceeded(f"request {seq.request_id!r} missed its deadline by {late:.3f} s: {took:.3f} s after "
                                 f"it reached the router, {len(seq.output)} of {seq.params.max_new_tokens} tokens "
                                 "generated")
        task.add_done_callback(_retrieved)  # the caller has `error`; the run's own end needs no reader
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
        if self._directory_task is not None:
            self._directory_task.cancel()
        if self.catalog is not None:
            self.catalog.close()

    def step_times(self) -> list[tuple[int, int, float]]:
        """Recent steps as (sequences, new tokens, seconds)."""
        return list(self.step_log)

    def stats(self) -> dict:
        ex = self.engine.exchange
        groups = getattr(ex, "groups_formed", None)
        plane = {"process_groups_formed": groups, "transport": ex.backend, "generation": ex.generation,
                 "data_plane_refused": ex.refused, "data_plane_malformed": ex.malformed,
                 "group_formation_seconds": ex.formation_s,
                 "data_plane_address": list(ex.address)} if groups is not None else {}
        return {"steps": self.steps, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                **_cuda_memory(self.device), "step_seconds": sum(s for _, _, s in self.step_log),
                "data_plane": self.data_plane, **plane,
                "wait_seconds": dict(self.engine.waits), "micro_batched_steps": self.engine.micro_steps,
                "waiting": len(self.scheduler.waiting),
                "running": len(self.scheduler.ready) + self.scheduler.in_flight, "contexts": len(self.contexts)}

    # -- the step loop --------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            batch = self.scheduler.schedule()  # admit
            if not batch:
                self._wake.clear()
                await self._wake.wait()
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
            for seq, logits in zip(batch, outs):  # sample, emit
                self._postprocess(seq, logits)

    def _postprocess(self, seq: Sequence, logits: torch.Tensor | None) -> None:
        if seq.kind == "segment":
            return self._finish(seq)
        if seq.kind == "logits":
            seq.logits.append(logits.cpu().numpy())
            return self._finish(seq)
        if seq.t_first is None:
            seq.t_first = time.perf_counter()
            seq.freeze_pathway()
        if seq.params.max_new_tokens == 0:
            return self._finish(seq, reason="length")
        token = sample(logits, seq.params, seq.generator)
        seq.output.append(token)
        seq.token_ids.append(token)
        if seq.stream is not None:
            seq.stream.put_nowait(token)
        if token in self.cfg.eos_token_id or token in seq.params.stop_token_ids or seq.cancelled:
            self._finish(seq, reason="stop")
        elif len(seq.output) >= seq.params.max_new_tokens:
            self._finish(seq, reason="length")
        else:
            self.scheduler.keep_running(seq)

    def _finish(self, seq: Sequence, reason: str | None = None, error: BaseException | None = None) -> None:
        seq.finish_reason = reason
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
        lost = await self._drop_lost_contexts() if recoverable else {}
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

    async def _drop_lost_contexts(self) -> dict[str, str]:
        """Ready contexts with a segment that its shard no longer holds (the shard restarted, or
        Ray reports it not alive: its memory is gone, and there is no store to reload it from):
        drop them; return id -> why, for their requests."""
        if all(r.info.stored or not r.ready for r in self.contexts.values()):
            return {}  # stored contexts are reopened from the store: no shard need be asked (a lost one may hang)
        states = [down(s) for s in self.shards]
        # a shard that is back answers in seconds; one that cannot be placed holds nothing we can serve
        held = await asyncio.gather(*(asyncio.sleep(0) if st else call(s, "contexts", timeout_s=10.0)
                                      for s, st in zip(self.shards, states)), return_exceptions=True)
        lost = {}
        for cid, record in list(self.contexts.items()):
            if not record.ready or record.info.stored:  # a stored context: its shard reopens it from the store
                continue
            gone = [s.shard for s in record.segments
                    if states[s.shard] or (isinstance(held[s.shard], dict) and cid not in held[s.shard])]
            if gone:
                why = (f"Ray reports its actor {states[gone[0]]}" if states[gone[0]] else "the shard restarted")
                lost[cid] = (f"context {cid!r} was lost with context shard {gone[0]}: {why} and the mesh has no store "
                             "to reload it from; register it again")
                del self.contexts[cid]
                self.engine.summaries.pop(cid, None)
                record.dropped = True
                if record.active == 0:
                    await self._drop_segments(record)
        self._remember_lost(lost)
        return lost

    async def _run(self, seq: Sequence) -> None:
        """Queue a sequence for the step loop and wait until it finishes."""
        if not self._loop_tasks or any(t.done() for t in self._loop_tasks):
            for t in self._loop_tasks:
                t.cancel()
            self._wake = asyncio.Event()
            loop = asyncio.get_running_loop()
            self._loop_tasks = [loop.create_task(self._loop()) for _ in range(self.scheduler.lanes)]
        if self.catalog is not None and (self._directory_task is None or self._directory_task.done()):
            self._directory_task = asyncio.get_running_loop().create_task(self._directory_loop())
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
                    await self._drop_segments(record)

    # -- helpers --------------------------------------------------------------------------
    def _sequence(self, kind: str, request: Request) -> Sequence:
        """The router's state for a request, checked against this model (vocabulary, positions)."""
        self._check_tokens(request.prompt_ids, "prompt")
        request_id = request.request_id or f"req-{next(self._ids)}"
        left = request.seconds_left()
        if left is not None and left <= 0:
            raise DeadlineExceeded(f"request {request_id!r} reached the router {-left:.3f} s after its deadline; "
                                   "nothing was run")
        params = request.params if kind == "generate" else SamplingParams(max_new_tokens=0)
        segments, start, files = [], 0, {}
        if request.context_id is not None:
            record = self._record(request.context_id)
            segments, start = record.segments, record.info.num_tokens
            files = {s.shard: (f, s.start, s.end) for s, f in zip(record.segments, record.files)}
        total = start + len(request.prompt_ids) + params.max_new_tokens
        if total > self.cfg.max_position_embeddings:
            raise ValueError(f"context ({start}) + prompt ({len(request.prompt_ids)}) + max_new_tokens "
                             f"({params.max_new_tokens}) = {total} exceeds max_position_embeddings "
                             f"({self.cfg.max_position_embeddings})")
        return Sequence(request_id, kind, list(request.prompt_ids), start, segments, request.context_id, params,
                        self.cfg.num_layers, request.top_shards, request.tenant, top_pages=request.top_pages,
                        segment_files=files, deadline=request.deadline, pool=self.engine.kv_pool)

    def _check_tokens(self, ids: list[int], what: str) -> None:
        if len(ids) == 0:
            raise ValueError(f"the {what} is empty; at least 1 token is needed")
        arr = np.asarray(ids)
        if arr.dtype.kind not in "iu":
            raise ValueError(f"{what} token ids must be integers, got dtype {arr.dtype}")
        bad = (arr < 0) | (arr >= self.cfg.vocab_size)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{what} token id {int(arr[i])} at index {i} is outside the vocabulary "
                             f"[0, {self.cfg.vocab_size})")

    def _running(self) -> list[Any]:
        """Each shard's handle, or None where Ray does not report it alive (liveness.py)."""
        return [None if down(s) else s for s in self.shards]

    def _remember_lost(self, why: dict[str, str]) -> None:
        self.lost.update(why)
        while len(self.lost) > 10_000:  # remembered for clear errors, bounded
            self.lost.pop(next(iter(self.lost)))

    def _record(self, context_id: str) -> ContextRecord:
        self._sync_directory(2 * SYNC_S)  # only if the directory loop fell behind
        self._lookup_stored(context_id)
        record = self.contexts.get(context_id)
        if record is None or not record.ready:
            why = self.catalog.unavailable.get(context_id) if self.catalog is not None else None
            raise ContextNotFound(why or self.lost.get(context_id, f"context {context_id!r} is not registered"))
        return record

    def _used_tokens(self) -> list[int]:
        used = [0] * len(self.shards)
        for record in list(self.contexts.values()):
            for s in record.segments:
                if s.shard < len(used):  # (not a shard only a bigger mesh on the store has)
                    used[s.shard] += s.end - s.start
        return used

    def _free_tokens(self) -> list[int]:
        cap = self.capacity_tokens if self.capacity_tokens is not None else 1 << 62
        return [cap - u for u in self._used_tokens()]

    async def _drop_segments(self, record: ContextRecord) -> None:
        where = [(s.shard, record.info.id) for s in record.segments] + self.engine.forget(record.info.id)
        running = self._running()  # one Ray does not report alive holds nothing (it comes back empty)
        await asyncio.gather(*(call(running[shard], "drop", name, timeout_s=10.0) for shard, name in where
                               if shard < len(running) and running[shard] is not None), return_exceptions=True)
        if self.catalog is not None:
            self.catalog.release(record.info.id)  # its files, unless another context (of any mesh) names them


def _retrieved(task: asyncio.Future) -> None:
    """Mark a background run's end as seen (its error, if any, reached its caller another way)."""
    if not task.cancelled():
        task.exception()


def _cuda_memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"cuda_memory_allocated_bytes": torch.cuda.memory_allocated(device),
            "cuda_max_memory_allocated_bytes": torch.cuda.max_memory_allocated(device)}


RemoteRouter = ray.remote(Router)
