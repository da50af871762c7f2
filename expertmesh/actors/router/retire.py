"""How segments leave the shards, once no request reads them there.

- a dropped context (contexts.py `drop`): when the last request over it ends, on this router
  and on the mesh's others (`quiet`: a drop fences every router's running requests, store or
  not), or at once when none runs, its shards and any shard standing in for one let its segments go, and the store
  deletes its files unless another context of any mesh names them (catalog.py `release`);
- a moved segment (placement.py, or a move learned from another router or mesh): once the
  requests begun before the move have ended, its old shard (and any stand-in for it) lets it
  go; until then `busy` keeps another segment of the context from moving onto that shard.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Iterable

from expertmesh.actors.router.shards import Shards
from expertmesh.engine.engine import Engine
from expertmesh.engine.sequence import Sequence
from expertmesh.engine.takeover import alias
from expertmesh.store.catalog import Catalog
from expertmesh.store.registry import ContextRecord

LET_GO_POLL_S = 0.05  # a move's clean-up waiting for a request admitted but not started yet looks again after this


class Retiring:
    def __init__(self, shards: Shards, engine: Engine, catalog: Catalog | None,
                 in_flight: Callable[[], Iterable[Sequence]]) -> None:
        """in_flight(): the router's requests now (admitted, running or streaming)."""
        self.shards, self.engine, self.catalog, self.in_flight = shards, engine, catalog, in_flight
        self.busy: dict[str, set[int]] = {}  # context id -> shards letting go of a moved segment
        # quiet(context id): awaits the mesh's other routers running no request over it (directory.py);
        # None: this router is the mesh's only one
        self.quiet: Callable[[str], Awaitable] | None = None
        self._fencing: set[str] = set()  # dropped contexts waiting for the other routers
        self._tasks: set[asyncio.Task] = set()

    async def dropped(self, record: ContextRecord) -> None:
        """A dropped context's segments go, if no request of this router reads it (else the last
        one to end calls this again: `Router._run`) and, where the mesh has other routers, once
        none of theirs does either (`quiet`, in the background: nobody waits on it)."""
        if not record.dropped or record.active > 0:
            return
        if self.quiet is None:
            return await self._let_go_dropped(record)
        cid = record.info.id
        if cid in self._fencing:
            return
        self._fencing.add(cid)

        async def fenced() -> None:
            try:
                await self.quiet(cid)
                await self._let_go_dropped(record)
            finally:
                self._fencing.discard(cid)
        self._spawn(fenced())

    async def _let_go_dropped(self, record: ContextRecord) -> None:
        cid = record.info.id
        await self.shards.drop([(s.shard, cid) for s in record.segments] + self.engine.forget(cid))
        if self.catalog is not None:
            self.catalog.release(cid)  # its files, unless another context (of any mesh) names them

    def dropped_later(self, record: ContextRecord) -> None:
        """`dropped`, from code that cannot await (applying what another router or mesh did)."""
        self._spawn(self.dropped(record))

    def moved(self, record: ContextRecord, shard: int) -> None:
        """Segment of `record` moved off `shard`: that shard lets it go once no request begun
        before reads it there."""
        self.busy.setdefault(record.info.id, set()).add(shard)
        self._spawn(self._let_go(record, shard))

    def _spawn(self, work) -> None:
        try:
            task = asyncio.get_running_loop().create_task(work)
        except RuntimeError:  # no event loop (an in-process router outside a request): nothing runs
            work.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _let_go(self, record: ContextRecord, shard: int) -> None:
        cid = record.info.id
        while True:  # woken as those requests end (one not started yet: looked at again shortly)
            before = [s for s in self.in_flight()
                      if s.context_id == cid and any(g.shard == shard for g in s.segments)]
            if not before:
                break
            running = [s.done for s in before if s.done is not None and not s.done.done()]
            if len(running) < len(before):  # ended (leaving the table next) or not started yet
                await asyncio.sleep(0 if all(s.done is not None for s in before) else LET_GO_POLL_S)
            else:
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        try:
            if all(s.shard != shard for s in record.segments):
                record.summaries.pop(shard, None)
                await self.shards.drop([(shard, cid)])
            name = alias(cid, shard)
            for host, adopted in [x for x in self.engine.adopted if x[1] == name]:
                self.engine.exchange.release(host, adopted)
                self.engine.adopted.discard((host, adopted))
        except Exception:  # noqa: BLE001 - a shard that died meanwhile holds nothing any more
            pass
        finally:
            left = self.busy.get(cid)
            if left is not None:
                left.discard(shard)
                if not left:
                    self.busy.pop(cid, None)
