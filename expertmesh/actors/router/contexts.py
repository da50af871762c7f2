"""The one owner of a router's contexts: their records, the lost ones with why, the Quest page
summaries and the one `drop`.

Registration, the directory and placement (registration.py, directory.py, placement.py) change
contexts only through this object; the step engine reads it through `ContextView`
(engine/config.py): the summaries as a read-only mapping, the tokens per shard and the shards
past this mesh's. Every change a router makes or learns is published as an `Entry` under the
context's id (`published`, long_poll.py), which the mesh's other routers follow (directory.py).
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Mapping

import torch

from expertmesh.actors.router.long_poll import Snapshots
from expertmesh.actors.router.shards import Shards
from expertmesh.store.manifest import Manifest
from expertmesh.store.registry import ContextInfo, ContextRecord, Segment

LOST_KEPT = 10_000  # lost or dropped ids remembered (for clear errors), the oldest forgotten first

Summaries = dict[int, list[tuple[torch.Tensor, torch.Tensor] | None]]  # shard -> [layer] (kmin, kmax) [P, Hkv, D]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One context as a router publishes it: what another router of the mesh needs to serve it
    (info, segments, files, how often they moved) or to refuse it (`dropped`: why, as it says)."""

    id: str
    info: ContextInfo | None
    segments: tuple[Segment, ...] = ()
    files: tuple[str, ...] = ()
    moves: int = 0
    dropped: str | None = None

    def record(self) -> ContextRecord:
        """A ready record of a published context (its shards open it at first use)."""
        return ContextRecord(self.info, list(self.segments), files=list(self.files), ready=True, moves=self.moves)


def record_of(m: Manifest) -> ContextRecord:
    """A stored context's record from its manifest, ready (its shards open its files at first use)."""
    info = ContextInfo(m.id, m.num_tokens, tuple(e.shard for e in m.segments), m.mode, m.owner, m.visibility,
                       m.name, m.created, m.kv_dtype, True, m.chat)
    return ContextRecord(info, [Segment(e.shard, e.start, e.end) for e in m.segments],
                         files=[e.file for e in m.segments], ready=True)


class Contexts:
    def __init__(self, shards: Shards) -> None:
        self._shards = shards
        self._records: dict[str, ContextRecord] = {}  # registered (ready) or registering
        self._lost: dict[str, str] = {}  # context id -> why it is refused (dropped, or lost with a shard)
        self._summaries: dict[str, Summaries] = {}
        self._foreign: frozenset[int] = frozenset()  # shard indices named by contexts stored by a bigger mesh
        self.summaries: Mapping[str, Summaries] = MappingProxyType(self._summaries)  # what the engine reads
        self.published = Snapshots()

    # -- reading ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, context_id: str) -> bool:
        return context_id in self._records

    def get(self, context_id: str | None) -> ContextRecord | None:
        return self._records.get(context_id) if context_id is not None else None

    def records(self) -> list[ContextRecord]:
        """Every record now, registrations in flight included (a copy: callers may await)."""
        return list(self._records.values())

    def listing(self) -> list[ContextInfo]:
        return [r.info for r in self.records() if r.ready]

    def known(self, context_id: str) -> bool:
        """Recorded here, or refused (dropped or lost): not to be adopted from a listing again."""
        return context_id in self._records or context_id in self._lost

    def why_lost(self, context_id: str) -> str | None:
        return self._lost.get(context_id)

    def served_stored(self) -> frozenset[str]:
        """Ids of the stored contexts this router answers."""
        return frozenset(r.info.id for r in self.records() if r.ready and r.info.stored)

    def shard_tokens(self) -> list[int]:
        """Context tokens held per shard of this mesh (one entry per shard)."""
        used = [0] * len(self._shards)
        for record in self.records():
            for s in record.segments:
                if s.shard < len(used):  # (not a shard only a bigger mesh on the store has)
                    used[s.shard] += s.end - s.start
        return used

    def foreign_shards(self) -> set[int]:
        """Shard indices past this mesh's that stored contexts name (a bigger mesh stored them)."""
        n = len(self._shards)
        return {s for s in self._foreign if s >= n}

    # -- changing ---------------------------------------------------------------------------
    def begin(self, record: ContextRecord) -> None:
        """A registration in flight: its id is taken here; not listed or served until `serve`."""
        self._records[record.info.id] = record

    def discard(self, context_id: str) -> None:
        """A registration that failed: forgotten (its id is free again)."""
        self._records.pop(context_id, None)
        self._summaries.pop(context_id, None)

    def serve(self, record: ContextRecord) -> None:
        """Serve a context from now on: registered here, or adopted (from the store, the shards or
        another router: callers skip the `known` ones)."""
        cid = record.info.id
        record.ready = True
        self._records[cid] = record
        self._lost.pop(cid, None)
        self._note_foreign(record)
        self._publish(record)

    def keep_summaries(self, record: ContextRecord, which: list[int], per_segment: list) -> None:
        """Page summaries of segments `which` as their shards sent them ([layer] (kmin, kmax) numpy
        pairs, or None): kept per shard, read by the engine from now on."""
        for i, summ in zip(which, per_segment):
            record.summaries[record.segments[i].shard] = [
                None if x is None else (torch.from_numpy(x[0]), torch.from_numpy(x[1])) for x in summ]
        self._summaries[record.info.id] = record.summaries

    def move(self, record: ContextRecord, moves: dict[int, int], opened: dict[int, list] | None = None,
             count: int | None = None) -> list[int]:
        """Segments of a context now live elsewhere: segment place i -> shard (new requests plan
        their items there; those begun before keep the old shards' summaries). `opened`: the
        summaries the new shard sent for place i; otherwise the old shard's (the same pages).
        count: the context's move count now (as another router published it; default one
        more). Returns the old shards, per move."""
        before, segments, old = dict(record.summaries), list(record.segments), []
        for i, dst in moves.items():
            old.append(segments[i].shard)
            segments[i] = Segment(dst, segments[i].start, segments[i].end)
        record.segments = segments
        record.info = dataclasses.replace(record.info, shards=tuple(s.shard for s in segments))
        record.moves = record.moves + 1 if count is None else count
        for (i, dst), src in zip(moves.items(), old):
            if opened is not None and i in opened:
                self.keep_summaries(record, [i], [opened[i]])
            elif src in before:
                record.summaries[dst] = before[src]
        self._note_foreign(record)
        self._publish(record)
        return old

    def drop(self, context_id: str, why: str, told: str | None = None) -> ContextRecord | None:
        """The one drop: refuse the context from now on with `why` (and the mesh's other routers
        with `told`, by default the same) and forget its summaries. Returns its record, marked
        dropped (None if it was not here): its segments go once no request reads it
        (`Retiring.dropped`). An id refused already is left as it is."""
        if context_id in self._lost and context_id not in self._records:
            return None
        record = self._records.pop(context_id, None)
        self._summaries.pop(context_id, None)
        self._lost[context_id] = why
        while len(self._lost) > LOST_KEPT:  # remembered for clear errors, bounded
            oldest = next(iter(self._lost))
            self._lost.pop(oldest)
            self.published.forget(oldest)
        info = record.info if record is not None else None  # which registration of the id was dropped
        self.published.publish(context_id, Entry(context_id, info, dropped=told or why))
        if record is not None:
            record.dropped = True
        return record

    def _publish(self, record: ContextRecord) -> None:
        self.published.publish(record.info.id, Entry(record.info.id, record.info, tuple(record.segments),
                                                     tuple(record.files), record.moves))

    def _note_foreign(self, record: ContextRecord) -> None:
        n = len(self._shards)
        beyond = {s.shard for s in record.segments if s.shard >= n}
        if not beyond <= self._foreign:
            self._foreign = self._foreign | beyond  # replaced whole: the engine's thread reads it
