"""Router: registers contexts over the shards and runs requests in shared batches.

The step loop reads like the work it does: admit, run the layers (attend over each request's
pathway, route tokens to expert groups), sample, emit. Requests arriving while others decode
join at the next step. A bad request gets its own error; the actor and the batch live on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import collections
import itertools
import math
import os
import time
import uuid
from typing import Any, AsyncIterator

import numpy as np
import ray
import torch

from expertmesh.actors.collective import CollectiveExchange
from expertmesh.actors.engine import Engine
from expertmesh.actors.exchange import TaskExchange, call, check_data_plane
from expertmesh.actors.names import lookup
from expertmesh.actors.scheduler import Scheduler
from expertmesh.actors.sequence import Sequence
from expertmesh.errors import ContextNotFound, DataPlaneError, Unavailable
from expertmesh.model.checkpoint import load_model
from expertmesh.model.device import resolve_device, resolve_dtype
from expertmesh.model.moe import expert_partition
from expertmesh.model.sampling import SamplingParams, sample
from expertmesh.store.catalog import Catalog, tokens_sha256
from expertmesh.store.fingerprint import model_fingerprint
from expertmesh.store.manifest import Manifest, SegmentEntry
from expertmesh.store.registry import MODES, ContextInfo, ContextRecord, Segment, plan_segments


class Router:
    def __init__(self, checkpoint: str, shards: list[Any], groups: list[Any], capacity_tokens: int | None,
                 num_threads: int | None = None, max_batch_tokens: int = 16384, lanes: int = 2,
                 data_plane: str = "collective", store: str | None = None, kv_dtype: str = "float32",
                 page_size: int = 64, fingerprint: str | None = None, device: str = "cpu",
                 dtype: str = "float32") -> None:
        """data_plane: "collective" (one Ray call per actor per step, per-layer tensors over a
        torch.distributed group; steps run one at a time) or "ray" (a Ray task per actor per layer;
        `lanes` step loops overlap). In-process shards and groups are called directly.
        store: the mesh's context store (a directory or URI); its contexts are listed at once.
        device / dtype: where and in what the dense layers compute (see model/device.py)."""
        # the router runs every dense layer of every step: all of its host's cores by default
        torch.set_num_threads(num_threads or os.cpu_count() or 1)
        self.checkpoint = checkpoint
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = load_model(checkpoint, with_experts=False, dtype=self.dtype,
                                device=self.device).requires_grad_(False)
        self.cfg = self.model.cfg
        self.shards, self.groups = lookup(shards), lookup(groups)  # names: see cluster.actor_name
        shards, groups = self.shards, self.groups
        self.capacity_tokens = capacity_tokens
        self.kv_dtype, self.page_size = kv_dtype, page_size
        unit = math.lcm(self.cfg.alignment, page_size)
        self.piece_tokens = max(unit, max_batch_tokens // unit * unit)  # registration runs in pieces this long
        self.catalog: Catalog | None = None
        if store is not None:
            self.fingerprint = fingerprint or model_fingerprint(checkpoint)
            self.catalog = Catalog.open(store, self.fingerprint, {"architecture": self.cfg.architecture,
                                                                  "checkpoint": str(checkpoint)})
        self.partition = expert_partition(self.cfg.num_experts, len(groups)) if any(self.cfg.moe_layers) else []
        self.contexts: dict[str, ContextRecord] = {}
        self.lost: dict[str, str] = {}  # context id -> why it was lost (a shard restarted without a store)
        self._by_id: dict[str, Sequence] = {}  # running requests, for cancel()
        remote = all(isinstance(t, ray.actor.ActorHandle) for t in shards + groups)
        if remote and check_data_plane(data_plane) == "collective":
            exchange = CollectiveExchange(shards, groups, self.cfg.num_heads, self.cfg.head_dim, self.cfg.hidden_size,
                                          self.device)
            lanes = 1  # one step at a time over the group
        else:
            exchange = TaskExchange(shards, groups)
        self.data_plane = data_plane if remote else "in-process"
        self.engine = Engine(self.model, exchange, self.partition, {})
        self.scheduler = Scheduler(max_batch_tokens=max_batch_tokens, lanes=lanes)
        self._wake: asyncio.Event | None = None
        self._loop_tasks: list[asyncio.Task] = []
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

    async def register_context(self, token_ids: list[int], mode: str = "exact", shards: int | None = None,
                               context_id: str | None = None, owner: str = "default",
                               visibility: str = "private", name: str | None = None) -> ContextInfo:
        """Compute the context's KV into segment files on the shards, piece by piece (bounded
        memory); with a store, its manifest is written last. Stored KV of the same tokens (same
        model, mode and cut) is reused instead of recomputed."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self._check_tokens(token_ids, "context")
        token_ids = np.asarray(token_ids, dtype=np.int64)
        cid = context_id or f"ctx-{uuid.uuid4().hex[:12]}"
        if cid in self.contexts:
            raise ValueError(f"context id {cid!r} is already registered")
        if len(token_ids) > self.cfg.max_position_embeddings:
            raise ValueError(f"context of {len(token_ids):,} tokens exceeds max_position_embeddings "
                             f"({self.cfg.max_position_embeddings:,})")
        segments = plan_segments(len(token_ids), self._free_tokens(), self.capacity_tokens,
                                 self.cfg.alignment, shards)
        info = ContextInfo(cid, len(token_ids), tuple(s.shard for s in segments), mode, owner, visibility, name,
                           time.time(), self.kv_dtype, self.catalog is not None)
        record = ContextRecord(info, segments)
        record.files = [f"{cid}.{i}.kv" for i in range(len(segments))]
        record.nbytes = [0] * len(segments)
        digests = self._digests(token_ids, segments)
        reused = self._reuse(record, digests)
        self.contexts[cid] = record
        try:
            if reused:  # stored KV of the same tokens (same model, mode, positions): no recompute
                await self._open_segments(record, reused)
            todo = [i for i in range(len(segments)) if i not in reused]
            if todo:
                await self._compute_segments(record, token_ids, todo)
            if self.catalog is not None:
                self.catalog.add(self._manifest(record, digests))
        except BaseException:
            self.contexts.pop(cid, None)
            self.engine.summaries.pop(cid, None)
            await asyncio.gather(*(call(self.shards[s.shard], "drop", cid) for s in segments),
                                 return_exceptions=True)
            raise
        record.ready = True
        record.opened = True
        return info

    async def _compute_segments(self, record: ContextRecord, token_ids: np.ndarray, todo: list[int]) -> None:
        """Run the pieces of segments `todo` and append their KV to new segment files; exact: in
        order, each piece attending to everything stored before it; blockwise: each segment on
        its own."""
        cid, segments, cfg = record.info.id, record.segments, self.cfg
        heads, head_dim = cfg.num_kv_heads, cfg.head_dim
        meta = {"info": dataclasses.asdict(record.info), "files": list(record.files),
                "segments": [dataclasses.astuple(s) for s in segments]}
        await asyncio.gather(*(call(self.shards[segments[i].shard], "begin", cid, record.files[i], segments[i].start,
                                    segments[i].end, cfg.num_layers, heads, head_dim, meta) for i in todo))

        async def piece(i: int, seg: Segment, a: int, b: int) -> None:
            seen = segments[:i] if record.info.mode == "exact" else []
            if a > seg.start:  # the pages of this segment already written
                seen = [*seen, Segment(seg.shard, seg.start, a)]
            seq = Sequence(f"{cid}/seg{i}/{a}", "segment", token_ids[a:b].tolist(), a, seen, cid,
                           SamplingParams(max_new_tokens=0), cfg.num_layers)
            seq.segment_files = {s.shard: (f, s.start, s.end) for s, f in zip(segments, record.files)}
            await self._run(seq)
            layers = [seq.kv.get(n) for n in range(cfg.num_layers)]
            await call(self.shards[seg.shard], "append", cid, a, [x[0].float().cpu().numpy() for x in layers],
                       [x[1].float().cpu().numpy() for x in layers], layers[0][2].cpu().numpy())

        async def segment(i: int, seg: Segment) -> None:
            for a in range(seg.start, seg.end, self.piece_tokens):
                await piece(i, seg, a, min(seg.end, a + self.piece_tokens))

        if record.info.mode == "exact":
            for i in todo:
                await segment(i, segments[i])
        else:
            await asyncio.gather(*(segment(i, segments[i]) for i in todo))
        done = await asyncio.gather(*(call(self.shards[segments[i].shard], "finish", cid) for i in todo))
        for i, (n, _) in zip(todo, done):
            record.nbytes[i] = n
        self._keep_summaries(record, todo, [summ for _, summ in done])

    async def _open_segments(self, record: ContextRecord, which: list[int] | None = None) -> None:
        """Have the shards serve stored segment files of a context (after a restart, or reuse)."""
        cid = record.info.id
        which = list(range(len(record.segments))) if which is None else which
        summ = await asyncio.gather(*(call(self.shards[record.segments[i].shard], "open", cid, record.files[i],
                                           record.segments[i].start, record.segments[i].end) for i in which))
        self._keep_summaries(record, which, summ)
        record.opened = True

    def _keep_summaries(self, record: ContextRecord, which: list[int], per_segment: list) -> None:
        for i, summ in zip(which, per_segment):
            record.summaries[record.segments[i].shard] = [
                None if x is None else (torch.from_numpy(x[0]), torch.from_numpy(x[1])) for x in summ]
        self.engine.summaries[record.info.id] = record.summaries

    def _digests(self, token_ids: np.ndarray, segments: list[Segment]) -> list[tuple[str, str]]:
        """(segment tokens sha256, prefix sha256) per segment: what stored KV may be reused for."""
        if self.catalog is None:
            return [("", "")] * len(segments)
        return [(tokens_sha256(token_ids[s.start:s.end]), tokens_sha256(token_ids[:s.end])) for s in segments]

    def _reuse(self, record: ContextRecord, digests: list[tuple[str, str]]) -> list[int]:
        """Point segments at stored files computed from the same tokens; returns their indices."""
        if self.catalog is None:
            return []
        out = []
        for i, (seg, (tokens, prefix)) in enumerate(zip(record.segments, digests)):
            entry = self.catalog.reusable_segment(record.info.mode, seg.start, seg.end, tokens, prefix,
                                                  self.kv_dtype, self.page_size)
            if entry is not None:
                record.files[i], record.nbytes[i] = entry.file, entry.nbytes
                out.append(i)
        return out

    def _manifest(self, record: ContextRecord, digests: list[tuple[str, str]]) -> Manifest:
        i = record.info
        return Manifest(i.id, i.num_tokens, i.mode, tuple(
            SegmentEntry(s.shard, s.start, s.end, f, n, tokens, prefix)
            for s, f, n, (tokens, prefix) in zip(record.segments, record.files, record.nbytes, digests)),
            i.owner, i.visibility, i.name, i.created, self.kv_dtype, self.page_size, self.fingerprint,
            digests[-1][1])  # the prefix hash of the last segment: all the context's tokens

    def _adopt_from_shards(self, timeout_s: float = 10.0) -> None:
        """A router restarted without a store: the contexts whose every segment its shard still
        holds are served again (the shards keep the router's description of each)."""
        if not self.shards or not all(isinstance(s, ray.actor.ActorHandle) for s in self.shards):
            return
        refs = [s.held.remote() for s in self.shards]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        held: list[dict] = []
        for ref in refs:
            try:
                held.append(ray.get(ref) if ref in ready else {})
            except Exception:  # noqa: BLE001 - a shard that is down holds nothing we can serve
                held.append({})
        for cid, meta in {c: m for h in held for c, m in h.items()}.items():
            segments = [Segment(*x) for x in meta["segments"]]
            if any(s.shard >= len(held) or cid not in held[s.shard] for s in segments):
                continue  # a segment is gone: the context was lost with its shard
            info = meta["info"]
            record = ContextRecord(ContextInfo(**{**info, "shards": tuple(info["shards"])}), segments)
            record.files, record.ready = list(meta["files"]), True
            self.contexts[cid] = record

    def _adopt(self, m: Manifest) -> None:
        """A stored context, listed at once; its shards open its files at first use."""
        if any(e.shard >= len(self.shards) for e in m.segments):
            self.catalog.unavailable[m.id] = (f"context {m.id} was stored by a mesh with more context shards "
                                              f"(segment on shard {max(e.shard for e in m.segments)}; this mesh "
                                              f"has {len(self.shards)})")
            return
        info = ContextInfo(m.id, m.num_tokens, tuple(e.shard for e in m.segments), m.mode, m.owner, m.visibility,
                           m.name, m.created, m.kv_dtype, True)
        record = ContextRecord(info, [Segment(e.shard, e.start, e.end) for e in m.segments])
        record.files, record.ready = [e.file for e in m.segments], True
        self.contexts[m.id] = record

    async def drop_context(self, context_id: str) -> None:
        record = self._record(context_id)
        record.dropped = True
        del self.contexts[context_id]
        self.engine.summaries.pop(context_id, None)
        if self.catalog is not None:  # the manifest goes first: the context is gone even if a delete fails
            self.catalog.location.delete(f"contexts/{context_id}.json")
        if record.active == 0:
            await self._drop_segments(record)

    def list_contexts(self) -> list[ContextInfo]:
        return [r.info for r in self.contexts.values() if r.ready]

    def get_context(self, context_id: str) -> ContextInfo:
        return self._record(context_id).info

    async def forward_logits(self, prompt_ids: list[int], context_id: str | None = None,
                             top_shards: int | None = None, top_pages: int | None = None) -> np.ndarray:
        await self._prepare(context_id)
        seq = self._sequence("logits", prompt_ids, context_id, SamplingParams(max_new_tokens=0), top_shards,
                             top_pages=top_pages)
        await self._run(seq)
        return torch.cat([torch.as_tensor(x) for x in seq.logits]).cpu().numpy()

    async def generate(self, prompt_ids: list[int], context_id: str | None = None, max_new_tokens: int = 32,
                       temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                       top_shards: int | None = None, stop_token_ids: tuple[int, ...] = (),
                       tenant: str = "default", request_id: str | None = None, top_pages: int | None = None) -> dict:
        params = SamplingParams(max_new_tokens, temperature, top_p, seed, tuple(stop_token_ids))
        await self._prepare(context_id)
        seq = self._sequence("generate", prompt_ids, context_id, params, top_shards, tenant, request_id, top_pages)
        await self._run(seq)
        return self._result(seq)

    async def stream(self, prompt_ids: list[int], context_id: str | None = None, max_new_tokens: int = 32,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                     top_shards: int | None = None, stop_token_ids: tuple[int, ...] = (),
                     tenant: str = "default", request_id: str | None = None,
                     top_pages: int | None = None) -> AsyncIterator[dict]:
        """Yield {"tokens": [int, ...]} as tokens are generated (several when the reader lags),
        then the final result dict."""
        params = SamplingParams(max_new_tokens, temperature, top_p, seed, tuple(stop_token_ids))
        await self._prepare(context_id)
        seq = self._sequence("generate", prompt_ids, context_id, params, top_shards, tenant, request_id, top_pages)
        seq.stream = asyncio.Queue()
        task = asyncio.ensure_future(self._run(seq))
        finished = False
        while not finished:
            tokens = [await seq.stream.get()]
            while not seq.stream.empty():  # coalesce what arrived meanwhile: fewer hops under load
                tokens.append(seq.stream.get_nowait())
            finished = tokens[-1] is None
            tokens = [t for t in tokens if t is not None]
            if tokens:
                yield {"tokens": tokens}
        await task
        yield self._result(seq)

    def cancel(self, request_id: str) -> bool:
        """Stop a request after its current step (e.g. its client hit a stop string or left)."""
        seq = self._by_id.get(request_id)
        if seq is None:
            return False
        seq.cancelled = True
        return True

    async def close(self) -> None:
        """Leave the data plane's process group; call before the actors are killed."""
        self.engine.close()

    def step_times(self) -> list[tuple[int, int, float]]:
        """Recent steps as (sequences, new tokens, seconds)."""
        return list(self.step_log)

    def stats(self) -> dict:
        groups = getattr(self.engine.exchange, "groups_formed", None)
        return {"steps": self.steps, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                **_cuda_memory(self.device), "step_seconds": sum(s for _, _, s in self.step_log),
                "data_plane": self.data_plane, **({"process_groups_formed": groups} if groups is not None else {}),
                "wait_seconds": dict(self.engine.waits), "waiting": len(self.scheduler.waiting),
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
        """Ready contexts with a segment that its shard no longer holds (the shard restarted and
        had no store to reload it from): drop them; return id -> why, for their requests."""
        held = await asyncio.gather(*(call(s, "contexts") for s in self.shards), return_exceptions=True)
        lost = {}
        for cid, record in list(self.contexts.items()):
            if not record.ready or record.info.stored:  # a stored context: its shard reopens it from the store
                continue
            gone = [s.shard for s in record.segments if isinstance(held[s.shard], dict) and cid not in held[s.shard]]
            if gone:
                lost[cid] = (f"context {cid!r} was lost with context shard {gone[0]}: the shard restarted and "
                             f"the mesh has no store to reload it from; register it again")
                del self.contexts[cid]
                self.engine.summaries.pop(cid, None)
                record.dropped = True
                if record.active == 0:
                    await self._drop_segments(record)
        self.lost.update(lost)
        while len(self.lost) > 10_000:  # remembered for clear errors, bounded
            self.lost.pop(next(iter(self.lost)))
        return lost

    async def _run(self, seq: Sequence) -> None:
        """Queue a sequence for the step loop and wait until it finishes."""
        if not self._loop_tasks or any(t.done() for t in self._loop_tasks):
            for t in self._loop_tasks:
                t.cancel()
            self._wake = asyncio.Event()
            loop = asyncio.get_running_loop()
            self._loop_tasks = [loop.create_task(self._loop()) for _ in range(self.scheduler.lanes)]
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
    def _sequence(self, kind: str, prompt_ids: list[int], context_id: str | None, params: SamplingParams,
                  top_shards: int | None, tenant: str = "default", request_id: str | None = None,
                  top_pages: int | None = None) -> Sequence:
        self._check_tokens(prompt_ids, "prompt")
        if top_shards is not None and top_shards < 1:
            raise ValueError(f"top_shards must be >= 1 or None (all shards), got {top_shards}")
        if top_pages is not None and (isinstance(top_pages, bool) or not isinstance(top_pages, int) or top_pages < 1):
            raise ValueError(f"top_pages must be an integer >= 1 or None (every page), got {top_pages!r}")
        segments, start, files = [], 0, {}
        if context_id is not None:
            record = self._record(context_id)
            segments, start = record.segments, record.info.num_tokens
            files = {s.shard: (f, s.start, s.end) for s, f in zip(record.segments, record.files)}
        total = start + len(prompt_ids) + params.max_new_tokens
        if total > self.cfg.max_position_embeddings:
            raise ValueError(f"context ({start}) + prompt ({len(prompt_ids)}) + max_new_tokens "
                             f"({params.max_new_tokens}) = {total} exceeds max_position_embeddings "
                             f"({self.cfg.max_position_embeddings})")
        seq = Sequence(request_id or f"req-{next(self._ids)}", kind, list(prompt_ids), start, segments,
                       context_id, params, self.cfg.num_layers, top_shards, tenant)
        seq.top_pages, seq.segment_files = top_pages, files
        return seq

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

    def _record(self, context_id: str) -> ContextRecord:
        record = self.contexts.get(context_id)
        if record is None or not record.ready:
            why = self.catalog.unavailable.get(context_id) if self.catalog is not None else None
            raise ContextNotFound(why or self.lost.get(context_id, f"context {context_id!r} is not registered"))
        return record

    async def _prepare(self, context_id: str | None) -> None:
        """A stored context's shards open its files (and send their summaries) at its first use."""
        record = self.contexts.get(context_id) if context_id is not None else None
        if record is not None and record.ready and not record.opened:
            await self._open_segments(record)

    def _free_tokens(self) -> list[int]:
        used = [0] * len(self.shards)
        for record in self.contexts.values():
            for s in record.segments:
                used[s.shard] += s.end - s.start
        cap = self.capacity_tokens if self.capacity_tokens is not None else 1 << 62
        return [cap - u for u in used]

    async def _drop_segments(self, record: ContextRecord) -> None:
        await asyncio.gather(*(call(self.shards[s.shard], "drop", record.info.id) for s in record.segments),
                             return_exceptions=True)
        if self.catalog is not None:
            self.catalog.remove(record.info.id)  # its files, unless another context reuses them

    def _result(self, seq: Sequence) -> dict:
        now = time.perf_counter()
        pathway = seq.pathway.summary(dict(seq.group_tokens)) if seq.pathway else {}
        if pathway:
            pathway["shards"] = sorted(seq.pathway_visits)
            pathway["pages"] = {shard: dict(r) for shard, r in sorted(seq.page_reads.items())}
        return {
            "request_id": seq.request_id, "token_ids": list(seq.output), "finish_reason": seq.finish_reason,
            "prompt_tokens": seq.prompt_len, "completion_tokens": len(seq.output),
            "context_tokens": seq.start_pos if seq.context_id else 0, "pathway": pathway,
            "ttft_s": (seq.t_first - seq.t_submit) if seq.t_first else None, "total_s": now - seq.t_submit,
        }


def _cuda_memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"cuda_memory_allocated_bytes": torch.cuda.memory_allocated(device),
            "cuda_max_memory_allocated_bytes": torch.cuda.max_memory_allocated(device)}


RemoteRouter = ray.remote(Router)
