"""Registering contexts: how the router turns token ids into KV segment files on the shards.

A collaborator of the router: registration in pieces of max_batch_tokens run through the
router's step loop (`run`), KV reuse from the store, manifests, and opening stored segments on
the shards at a context's first use. What it registers goes to the contexts' owner
(contexts.py), which publishes it to the mesh's other routers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
import uuid
from typing import Awaitable, Callable

import numpy as np
import ray

from expertmesh.actors.router.contexts import Contexts
from expertmesh.actors.router.shards import Shards
from expertmesh.dataplane.calls import call
from expertmesh.engine.sequence import Sequence
from expertmesh.errors import Unavailable
from expertmesh.mesh_spec import MeshSpec
from expertmesh.model.config import ModelConfig
from expertmesh.model.sampling import SamplingParams
from expertmesh.store.catalog import Catalog, tokens_sha256
from expertmesh.store.manifest import Manifest, SegmentEntry
from expertmesh.store.registry import (
    MODES,
    ContextInfo,
    ContextRecord,
    Segment,
    plan_segments,
)


def check_tokens(ids: list[int], what: str, vocab_size: int) -> None:
    """Token ids a model with `vocab_size` can read; the error names the first bad one."""
    if len(ids) == 0:
        raise ValueError(f"the {what} is empty; at least 1 token is needed")
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{what} token ids must be integers, got dtype {arr.dtype}")
    bad = (arr < 0) | (arr >= vocab_size)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{what} token id {int(arr[i])} at index {i} is outside the vocabulary [0, {vocab_size})")


KEEP_PROGRESS = 256  # registrations whose progress is remembered (the newest)


@dataclasses.dataclass
class Progress:
    """Where a registration is: tokens computed (or reused from the store) of all, since when."""

    context_id: str
    owner: str
    num_tokens: int
    started: float  # time.time()
    tokens_done: int = 0
    state: str = "registering"  # "ready", or "failed" (error says why)
    error: str | None = None
    finished: float | None = None

    def view(self) -> dict:
        now = self.finished or time.time()
        rate = self.tokens_done / max(now - self.started, 1e-6)
        left = (self.num_tokens - self.tokens_done) / rate if rate > 0 and self.state == "registering" else None
        return {**dataclasses.asdict(self), "tokens_per_s": rate, "eta_s": left}


class Registration:
    def __init__(self, cfg: ModelConfig, spec: MeshSpec, contexts: Contexts, shards: Shards, catalog: Catalog | None,
                 run: Callable[[Sequence], Awaitable[None]]) -> None:
        """run(seq): the router's step loop runs a sequence (a registration piece) to its end."""
        self.cfg, self.contexts, self.shards, self.catalog, self.run = cfg, contexts, shards, catalog, run
        self.kv_dtype, self.page_size, self.capacity_tokens = spec.kv_dtype, spec.page_size, spec.shard_capacity_tokens
        unit = math.lcm(cfg.alignment, spec.page_size)
        self.align = unit
        self.progress: dict[str, Progress] = {}  # the newest KEEP_PROGRESS registrations
        self.piece_tokens = max(unit, spec.max_batch_tokens // unit * unit)  # registration runs in pieces this long

    async def register(self, token_ids: list[int], mode: str = "exact", shards: int | None = None,
                       context_id: str | None = None, owner: str = "default", visibility: str = "private",
                       name: str | None = None, chat: str | None = None) -> ContextInfo:
        """Compute the context's KV into segment files on the shards, piece by piece (bounded
        memory); with a store, its manifest is written last. Stored KV of the same tokens (same
        model, mode and cut) is reused instead of recomputed."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        check_tokens(token_ids, "context", self.cfg.vocab_size)
        token_ids = np.asarray(token_ids, dtype=np.int64)
        cid = context_id or f"ctx-{uuid.uuid4().hex[:12]}"
        if cid in self.contexts or (self.catalog is not None and self.catalog.exists(cid)):
            raise ValueError(f"context id {cid!r} is already registered")
        if len(token_ids) > self.cfg.max_position_embeddings:
            raise ValueError(f"context of {len(token_ids):,} tokens exceeds max_position_embeddings "
                             f"({self.cfg.max_position_embeddings:,})")
        # segment starts on page boundaries, so any piece may write into any segment
        cap = self.capacity_tokens if self.capacity_tokens is not None else 1 << 62
        free, absent = [cap - u for u in self.contexts.shard_tokens()], self.shards.absent()
        if absent:  # a new context goes to the shards that are running
            running = len(self.shards) - len(absent)
            if running == 0 or (shards is not None and shards > running):
                raise Unavailable(f"{shards or 1} context shard(s) needed and {running} running: context shards "
                                  f"{sorted(absent)} are not (Ray reports {sorted(set(absent.values()))}); retry later")
            shards = shards or running
            free = [-1 if i in absent else f for i, f in enumerate(free)]
        segments = plan_segments(len(token_ids), free, self.capacity_tokens, self.align, shards)
        progress = self._track(Progress(cid, owner, len(token_ids), time.time()))
        info = ContextInfo(cid, len(token_ids), tuple(s.shard for s in segments), mode, owner, visibility, name,
                           time.time(), self.kv_dtype, self.catalog is not None, chat)
        record = ContextRecord(info, segments)
        record.files = [f"{cid}.{i}.kv" for i in range(len(segments))]
        record.nbytes = [0] * len(segments)
        digests = self._digests(token_ids, segments)
        reused = self._reuse(record, digests)
        self.contexts.begin(record)
        if self.catalog is not None:  # before any file: no other mesh's clean-up removes them meanwhile
            self.catalog.begin_pending(cid, record.files)
        try:
            if reused:  # stored KV of the same tokens (same model, mode, positions): no recompute
                await self.open_segments(record, reused)
                progress.tokens_done += sum(segments[i].end - segments[i].start for i in reused)
            todo = [i for i in range(len(segments)) if i not in reused]
            if todo:
                await self._compute_segments(record, token_ids, todo, progress)
            if self.catalog is not None:
                self.catalog.add(self._manifest(record, digests))
        except BaseException as exc:
            progress.state, progress.error, progress.finished = "failed", f"{type(exc).__name__}: {exc}", time.time()
            self.contexts.discard(cid)
            await asyncio.gather(*(call(self.shards[s.shard], "drop", cid, timeout_s=5.0) for s in segments),
                                 return_exceptions=True)  # best effort: a shard that cannot answer holds nothing
            if isinstance(exc, ray.exceptions.RayActorError):  # a shard's, not this router's: say which
                raise Unavailable(f"context {cid!r} was not registered: context shard(s) "
                                  f"{await self._unreachable_shards()} did not answer ({type(exc).__name__}); "
                                  "retry later") from None
            raise
        finally:
            if self.catalog is not None:
                self.catalog.end_pending(cid)
        record.opened = True
        self.contexts.serve(record)
        progress.state, progress.finished = "ready", time.time()
        return info

    def _track(self, progress: Progress) -> Progress:
        self.progress[progress.context_id] = progress
        while len(self.progress) > KEEP_PROGRESS:
            self.progress.pop(next(iter(self.progress)))
        return progress

    async def _unreachable_shards(self, timeout_s: float = 5.0) -> list[int]:
        got = await asyncio.gather(*(call(s, "contexts", timeout_s=timeout_s) for s in self.shards if s is not None),
                                   return_exceptions=True)
        live = [i for i, s in enumerate(self.shards) if s is not None]
        return [i for i, g in zip(live, got) if isinstance(g, BaseException)]

    async def _compute_segments(self, record: ContextRecord, token_ids: np.ndarray, todo: list[int],
                                progress: Progress) -> None:
        """Compute the KV of segments `todo` into new segment files, in pieces of at most
        max_batch_tokens. Exact: pieces run in order over the whole context, one step each, each
        attending to everything stored before it; a piece's KV rows go to the segments it covers
        (so a context of one piece is one step, as in a single process). Blockwise: each segment
        on its own."""
        cid, segments, cfg = record.info.id, record.segments, self.cfg
        heads, head_dim = cfg.num_kv_heads, cfg.head_dim
        meta = shard_meta(record)
        await asyncio.gather(*(call(self.shards[segments[i].shard], "begin", cid, record.files[i], segments[i].start,
                                    segments[i].end, cfg.num_layers, heads, head_dim, meta, cfg.kv_latent)
                                     for i in todo))
        exact = record.info.mode == "exact"

        async def piece(a: int, b: int, writes: list[int], own: int | None = None) -> None:
            """Tokens [a, b) as one step; their KV rows appended to segments `writes`."""
            if exact:  # everything before a: whole segments, and the written part of a partial one
                seen = [Segment(s.shard, s.start, min(s.end, a)) for s in segments if s.start < a]
            else:
                seen = [Segment(segments[own].shard, segments[own].start, a)] if a > segments[own].start else []
            seq = Sequence(f"{cid}/piece/{a}", "segment", token_ids[a:b].tolist(), a, seen, cid,
                           SamplingParams(max_new_tokens=0), cfg.num_layers)
            seq.segment_files = {s.shard: (f, s.start, s.end) for s, f in zip(segments, record.files)}
            await self.run(seq)
            layers = [seq.kv.get(n) for n in range(cfg.num_layers)]
            k = [x[0].float().cpu().numpy() for x in layers]
            v = [] if cfg.kv_latent else [x[1].float().cpu().numpy() for x in layers]  # latent: v is k
            pos = layers[0][2].cpu().numpy()
            calls = []
            for i in writes:
                lo, hi = max(a, segments[i].start) - a, min(b, segments[i].end) - a
                if lo < hi:
                    calls.append(call(self.shards[segments[i].shard], "append", cid, a + lo,
                                      [x[lo:hi] for x in k], [x[lo:hi] for x in v], pos[lo:hi]))
            await asyncio.gather(*calls)
            progress.tokens_done += b - a

        async def segment(i: int) -> None:
            seg = segments[i]
            for a in range(seg.start, seg.end, self.piece_tokens):
                await piece(a, min(seg.end, a + self.piece_tokens), [i], own=i)

        if exact and todo == list(range(todo[0], todo[-1] + 1)):
            lo, hi = segments[todo[0]].start, segments[todo[-1]].end
            for a in range(lo, hi, self.piece_tokens):
                await piece(a, min(hi, a + self.piece_tokens), todo)
        elif exact:  # reused segments between computed ones: segment by segment
            for i in todo:
                await segment(i)
        else:
            await asyncio.gather(*(segment(i) for i in todo))
        done = await asyncio.gather(*(call(self.shards[segments[i].shard], "finish", cid) for i in todo))
        for i, (n, _) in zip(todo, done):
            record.nbytes[i] = n
        self.contexts.keep_summaries(record, todo, [summ for _, summ in done])

    async def open_segments(self, record: ContextRecord, which: list[int] | None = None) -> None:
        """Have the shards serve stored segment files of a context (after a restart, or reuse)."""
        cid = record.info.id
        which = list(range(len(record.segments))) if which is None else which
        # a shard that is not running: whoever stands in opens its file at the first item (takeover.py)
        running = self.shards.running()
        up = [i for i in which if record.segments[i].shard < len(running) and running[record.segments[i].shard]]
        summ = await asyncio.gather(*(call(self.shards[record.segments[i].shard], "open", cid, record.files[i],
                                           record.segments[i].start, record.segments[i].end) for i in up))
        self.contexts.keep_summaries(record, up, summ)
        record.opened = len(up) == len(which)

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
            i.owner, i.visibility, i.name, i.created, self.kv_dtype, self.page_size, self.catalog.fingerprint,
            digests[-1][1], chat=i.chat)  # the prefix hash of the last segment: all the context's tokens

    async def prepare(self, context_id: str | None) -> None:
        """A stored context's shards open its files (and send their summaries) at its first use."""
        record = self.contexts.get(context_id)
        if record is not None and record.ready and not record.opened:
            await self.open_segments(record)


def shard_meta(record: ContextRecord) -> dict:
    """What a shard keeps of a context it holds a segment of: a restarted router without a store
    serves the context again from it (directory.py, `adopt_from_shards`)."""
    return {"info": dataclasses.asdict(record.info), "files": list(record.files),
            "segments": [dataclasses.astuple(s) for s in record.segments]}
