"""Where contexts' segments live: context shards added to a running mesh, and segments moved
between shards (`rebalance`). A mixin of the Router.

With a store a segment is a file any shard can open (takeover.py), so a move copies nothing:
the target shard opens the file (its page summaries come back), the router's record names the
target (requests that start from then on plan their items there, and the store's manifest is
rewritten so a restarted router finds the new layout), and once the requests that began
before the move have finished, the old shard lets the file go. No request waits or fails, and
logits are bit-equal: partials merge in context order wherever a segment lives (engine.py).
Without a store a segment is its shard's memory; it is not moved (the result says so).

`plan_moves` decides. First every segment on a shard Ray does not report alive goes to a
running shard (until then a stand-in served it); then segments go from the most loaded running
shard to others while a move lowers the most loaded shard's tokens, never onto a shard that
holds (or is still letting go of) another segment of the same context.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from expertmesh.actors.names import lookup
from expertmesh.dataplane.calls import call, tell
from expertmesh.dataplane.liveness import down
from expertmesh.engine.takeover import alias
from expertmesh.store.registry import ContextRecord, Segment

MOVE_TIMEOUT_S = 60.0  # a target shard opening one segment file (its summaries from the store)
LET_GO_POLL_S = 0.05  # a move's clean-up waiting for a request admitted but not started yet looks again after this


def plan_moves(layout: dict[str, list[tuple[int, int]]], running: list[bool], base: list[int] | None = None,
               busy: dict[str, set[int]] | None = None) -> list[tuple[str, int, int]]:
    """Moves (context id, segment place, target shard), in order.

    layout: context id -> [(shard, tokens)] per movable segment, in context order; running: per
    shard, whether it can take segments; base: tokens per shard that stay where they are;
    busy: context id -> shards that may not take a segment of it now."""
    n, busy = len(running), busy or {}
    load = list(base) if base is not None else [0] * n
    where = {cid: [s for s, _ in segs] for cid, segs in layout.items()}
    for segs in layout.values():
        for s, t in segs:
            load[s] += t
    live = [s for s in range(n) if running[s]]
    moves: list[tuple[str, int, int]] = []

    def free(cid: str, shard: int) -> bool:
        return shard not in where[cid] and shard not in busy.get(cid, ())

    def move(cid: str, i: int, dst: int) -> None:
        t = layout[cid][i][1]
        load[where[cid][i]] -= t
        load[dst] += t
        where[cid][i] = dst
        moves.append((cid, i, dst))

    stranded = sorted(((-t, cid, i) for cid, segs in layout.items() for i, (s, t) in enumerate(segs)
                       if not running[s]))  # the biggest first
    for _, cid, i in stranded:
        targets = [s for s in live if free(cid, s)]
        if targets:
            move(cid, i, min(targets, key=lambda s: (load[s], s)))
    while live:  # every move lowers the sum of squared loads: this ends
        src = max(live, key=lambda s: (load[s], -s))
        best = None
        for cid, segs in sorted(layout.items()):
            for i, (_, t) in enumerate(segs):
                if where[cid][i] != src:
                    continue
                for dst in live:
                    if free(cid, dst) and load[dst] + t < load[src]:
                        peak = max(load[src] - t, load[dst] + t)
                        if best is None or peak < best[0]:
                            best = (peak, cid, i, dst)
        if best is None:
            return moves
        move(*best[1:])
    return moves


class Placement:
    async def add_shards(self, names: list[str]) -> list[int]:
        """Context shards started for this mesh (`Mesh.add_shards`) join it: the next step's
        group takes them in, and new contexts may use them at once. Returns their indices."""
        handles = lookup(names)
        first = len(self.shards)
        await asyncio.to_thread(self.engine.exchange.add_shards, handles)  # after a step in flight
        self.shards = [*self.shards, *handles]
        self.engine.num_shards = len(self.shards)
        return list(range(first, len(self.shards)))

    def pool(self) -> dict:
        """Each context shard: Ray's state of its actor and the context tokens it holds."""
        used = self._used_tokens()
        return {"shards": [{"index": i, "state": down(h) or "ALIVE", "tokens": used[i]}
                           for i, h in enumerate(self.shards)],
                "contexts": sum(r.ready for r in self.contexts.values())}

    async def rebalance(self) -> dict:
        """Move stored contexts' segments off shards Ray does not report alive and from the most
        to the least loaded running shards (`plan_moves`). Returns what moved, the tokens per
        shard before and after, and the time it took; requests keep running throughout."""
        async with self._placing:
            t0 = time.perf_counter()
            running = [h is not None for h in self._running()]
            n = max([len(running)] + [s.shard + 1 for r in self.contexts.values() for s in r.segments])
            running += [False] * (n - len(running))  # shards only a bigger mesh on the store has: moved off
            base, layout, kept, lost = [0] * n, {}, 0, []
            for cid, record in list(self.contexts.items()):
                if not record.ready or record.dropped:
                    continue
                if record.info.stored:
                    layout[cid] = [(s.shard, s.end - s.start) for s in record.segments]
                    continue
                kept += 1
                for s in record.segments:
                    base[s.shard] += s.end - s.start
                    if not running[s.shard]:
                        lost.append(cid)
            before, moved = self._used_tokens(), []
            for cid, i, dst in plan_moves(layout, running, base, self._retiring):
                record = self.contexts.get(cid)
                if record is None or record.dropped:
                    continue  # dropped meanwhile
                t1, src = time.perf_counter(), record.segments[i].shard
                if await self._move(record, i, dst):
                    moved.append({"context": cid, "segment": i, "tokens": record.segments[i].end -
                                  record.segments[i].start, "from": src, "to": dst,
                                  "seconds": time.perf_counter() - t1})
            return {"moved": moved, "tokens_before": before, "tokens_after": self._used_tokens(),
                    "running": running[:len(self.shards)], "seconds": time.perf_counter() - t0,
                    "not_moved": {"contexts": kept, "lost": sorted(set(lost)),
                                  "why": "not in a store: a segment lives in its shard's memory"} if kept else {}}

    async def _move(self, record: ContextRecord, i: int, dst: int) -> bool:
        """Segment `i` of a stored context onto shard `dst` (see the module docstring)."""
        cid, seg = record.info.id, record.segments[i]
        summaries = await call(self.shards[dst], "open", cid, record.files[i], seg.start, seg.end,
                               timeout_s=MOVE_TIMEOUT_S)
        if record.dropped:  # while the target opened it: let go there too
            tell(self.shards[dst], "drop", cid)
            return False
        record.segments = [*record.segments[:i], Segment(dst, seg.start, seg.end), *record.segments[i + 1:]]
        record.info = dataclasses.replace(record.info, shards=tuple(s.shard for s in record.segments))
        self._keep_summaries(record, [i], [summaries])  # requests begun before keep the old shard's
        self._retire(record, seg.shard)
        if self.catalog is not None:
            await asyncio.to_thread(self.catalog.relocate, cid, list(record.info.shards))
        await self._tell_elsewhere("learn_move", cid, i, seg.shard, dst)  # the mesh's other routers
        return True

    async def learn_move(self, context_id: str, i: int, src: int, dst: int) -> bool:
        """Another router of this mesh moved segment i of a context from shard src to dst (it is
        open there, for every router): new requests read it there; this router's requests begun
        before keep the old shard until they end, then that shard lets it go here too."""
        record = self.contexts.get(context_id)
        if record is None or record.dropped or not 0 <= i < len(record.segments) or \
                record.segments[i].shard != src or not 0 <= dst < len(self.shards):
            return False
        seg = record.segments[i]
        record.segments = [*record.segments[:i], Segment(dst, seg.start, seg.end), *record.segments[i + 1:]]
        record.info = dataclasses.replace(record.info, shards=tuple(s.shard for s in record.segments))
        if src in record.summaries:  # the same pages: the same summaries
            record.summaries[dst] = record.summaries[src]
        self._retire(record, src)
        return True

    def _retire(self, record: ContextRecord, shard: int) -> None:
        self._retiring.setdefault(record.info.id, set()).add(shard)
        task = asyncio.get_running_loop().create_task(self._let_go(record, shard))
        self._letting_go.add(task)
        task.add_done_callback(self._letting_go.discard)

    async def _let_go(self, record: ContextRecord, shard: int) -> None:
        """Once no request begun before a move reads the segment on its old shard, that shard
        (and any shard standing in for it) lets it go."""
        cid = record.info.id
        while True:  # woken as those requests end (one not started yet: looked at again shortly)
            before = [s for s in self._by_id.values()
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
                if shard < len(self.shards) and self._running()[shard] is not None:
                    await call(self.shards[shard], "drop", cid, timeout_s=10.0)
            name = alias(cid, shard)
            for host, adopted in [x for x in self.engine.adopted if x[1] == name]:
                self.engine.exchange.release(host, adopted)
                self.engine.adopted.discard((host, adopted))
        except Exception:  # noqa: BLE001 - a shard that died meanwhile holds nothing any more
            pass
        finally:
            left = self._retiring.get(cid)
            if left is not None:
                left.discard(shard)
                if not left:
                    self._retiring.pop(cid, None)
