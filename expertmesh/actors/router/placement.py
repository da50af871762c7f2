"""Where contexts' segments live: context shards added to a running mesh, and segments moved
between shards (`rebalance`). A collaborator of the router.

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
import time
from typing import Any

import ray

from expertmesh.actors.names import lookup
from expertmesh.actors.router.contexts import Contexts
from expertmesh.actors.router.directory import Directory
from expertmesh.actors.router.registration import shard_meta
from expertmesh.actors.router.retire import Retiring
from expertmesh.actors.router.shards import Shards
from expertmesh.dataplane.calls import call, tell
from expertmesh.dataplane.liveness import down
from expertmesh.engine.engine import Engine
from expertmesh.errors import CapacityError
from expertmesh.store.catalog import Catalog
from expertmesh.store.registry import ContextRecord

MOVE_TIMEOUT_S = 60.0  # a target shard opening one segment file (its summaries from the store)
LET_GO_S = 120.0  # a leaving shard's segments let go (the requests begun before their moves finishing)


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
    def __init__(self, contexts: Contexts, shards: Shards, engine: Engine, catalog: Catalog | None,
                 retiring: Retiring, directory: Directory) -> None:
        self.contexts, self.shards, self.engine, self.catalog = contexts, shards, engine, catalog
        self.retiring, self.directory = retiring, directory
        self._placing = asyncio.Lock()  # one rebalance at a time

    async def add_shards(self, names: list[str]) -> list[int]:
        """Context shards started for this mesh (`Mesh.add_shards`) join it: the next step's
        group takes them in, and new contexts may use them at once. Returns their indices."""
        handles = lookup(names)
        await asyncio.to_thread(self.engine.exchange.add_shards, handles, len(self.shards))  # after a step in flight
        return self.shards.add(handles)

    async def pool(self) -> dict:
        """Each context shard: Ray's state of its actor, its host, the context tokens it holds and
        its KV by tier (bytes in its memory pool and its budget, bytes of segment files; a shard
        that does not answer within USAGE_TIMEOUT_S shows without them); each context's segments."""
        used = self.contexts.shard_tokens()
        states = [down(h) or "ALIVE" for h in self.shards]
        usage = await asyncio.gather(*(_usage(h) if st == "ALIVE" else _nothing() for h, st in zip(self.shards, states)))
        records = [r for r in self.contexts.records() if r.ready and not r.dropped]
        return {"shards": [{"index": i, "state": st, "tokens": used[i],
                            **({k: u[k] for k in ("host", "memory_bytes", "memory_budget_bytes", "store_bytes")}
                               if u else {})}
                           for i, (st, u) in enumerate(zip(states, usage))],
                "contexts": len(records),
                "segments": [{"context_id": r.info.id, "owner": r.info.owner, "visibility": r.info.visibility,
                              "name": r.info.name, "stored": r.info.stored, "num_tokens": r.info.num_tokens,
                              "segments": [{"shard": s.shard, "start": s.start, "end": s.end} for s in r.segments]}
                             for r in records]}

    async def rebalance(self) -> dict:
        """Move stored contexts' segments off shards Ray does not report alive and from the most
        to the least loaded running shards (`plan_moves`). Returns what moved, the tokens per
        shard before and after, and the time it took; requests keep running throughout."""
        async with self._placing:
            t0 = time.perf_counter()
            running = [h is not None for h in self.shards.running()]
            records = [r for r in self.contexts.records() if r.ready and not r.dropped]
            n = max([len(running)] + [s.shard + 1 for r in records for s in r.segments])
            running += [False] * (n - len(running))  # shards only a bigger mesh on the store has: moved off
            base, layout, kept, lost = [0] * n, {}, 0, []
            for record in records:
                cid = record.info.id
                if record.info.stored:
                    layout[cid] = [(s.shard, s.end - s.start) for s in record.segments]
                    continue
                kept += 1
                for s in record.segments:
                    base[s.shard] += s.end - s.start
                    if not running[s.shard]:
                        lost.append(cid)
            before, moved = self.contexts.shard_tokens(), []
            for cid, i, dst in plan_moves(layout, running, base, self.retiring.busy):
                record = self.contexts.get(cid)
                if record is None or record.dropped:
                    continue  # dropped meanwhile
                t1, src = time.perf_counter(), record.segments[i].shard
                if await self._move(record, i, dst):
                    moved.append({"context": cid, "segment": i, "tokens": record.segments[i].end -
                                  record.segments[i].start, "from": src, "to": dst,
                                  "seconds": time.perf_counter() - t1})
            return {"moved": moved, "tokens_before": before, "tokens_after": self.contexts.shard_tokens(),
                    "running": running[:len(self.shards)], "seconds": time.perf_counter() - t0,
                    "not_moved": {"contexts": kept, "lost": sorted(set(lost)),
                                  "why": "not in a store: a segment lives in its shard's memory"} if kept else {}}

    async def remove_shards(self, indices: list[int]) -> dict:
        """Move every segment off shards leaving the mesh (`Mesh.remove_shards`): stored ones as
        `rebalance` moves them (the target opens the file from the store), the others peer to
        peer (the target takes the file's bytes from the leaving shard); new contexts no longer
        go there. Returns once the leaving shards have let go of everything (requests that began
        before a move finish on the old shard). The routers then forget them (`forget_shards`)."""
        async with self._placing:
            t0 = time.perf_counter()
            bad = [s for s in indices if not isinstance(s, int) or not 0 <= s < len(self.shards) or self.shards[s] is None]
            if bad or not indices:
                raise ValueError(f"context shards {bad or indices} are not in the mesh; its shards: "
                                 f"{[s for s, h in enumerate(self.shards) if h is not None]}")
            running = [h is not None and s not in indices for s, h in enumerate(self.shards.running())]
            if not any(running):
                raise ValueError(f"taking out shards {indices} would leave no running context shard")
            self.shards.leaving |= set(indices)
            try:
                moved = await self._evacuate(set(indices), running)
                loop = asyncio.get_running_loop()
                deadline = loop.time() + LET_GO_S
                while any(set(indices) & busy for busy in self.retiring.busy.values()) and loop.time() < deadline:
                    await asyncio.sleep(0.05)  # requests begun before a move finish on the old shard
            except BaseException:
                self.shards.leaving -= set(indices)
                raise
            return {"moved": moved, "tokens_after": self.contexts.shard_tokens(), "removed": list(indices),
                    "seconds": time.perf_counter() - t0}

    async def _evacuate(self, leaving: set[int], running: list[bool]) -> list[dict]:
        records = [r for r in self.contexts.records() if r.ready and not r.dropped]
        layout = {r.info.id: [(s.shard, s.end - s.start) for s in r.segments] for r in records}
        moved = []
        for cid, i, dst in plan_moves(layout, running, busy=self.retiring.busy):
            record = self.contexts.get(cid)
            if record is None or record.dropped or record.segments[i].shard not in leaving:
                continue  # dropped meanwhile, or a move that only evens the load (rebalance's)
            src, seg = record.segments[i].shard, record.segments[i]
            if not (await self._move(record, i, dst) if record.info.stored else await self._carry(record, i, dst)):
                continue
            moved.append({"context": cid, "segment": i, "tokens": seg.end - seg.start, "from": src, "to": dst,
                          "how": "store" if record.info.stored else "peer"})
        left = {r.info.id: [s.shard for s in r.segments if s.shard in leaving] for r in self.contexts.records()
                if r.ready and not r.dropped}
        left = {cid: s for cid, s in left.items() if s}
        if left:
            raise CapacityError(f"segments of contexts {sorted(left)} found no other shard to go to (a context "
                                "keeps one segment a shard): add shards first, or drop those contexts")
        return moved

    async def _carry(self, record: ContextRecord, i: int, dst: int) -> bool:
        """Segment `i` of a context without a store onto shard `dst`: its file's bytes from the
        shard holding it, then as `_move`."""
        cid, seg = record.info.id, record.segments[i]
        name, start, end, data = await call(self.shards[seg.shard], "export_segment", cid, timeout_s=MOVE_TIMEOUT_S)
        summaries = await call(self.shards[dst], "import_segment", cid, name, start, end, data,
                               timeout_s=MOVE_TIMEOUT_S)
        if not await self._switch(record, i, dst, summaries):
            return False
        meta = shard_meta(record)  # the shards holding it describe the new layout (a restarted router reads it)
        await asyncio.gather(*(call(self.shards[s.shard], "describe", cid, meta) for s in record.segments),
                             return_exceptions=True)
        return True

    def forget_shards(self, indices: list[int]) -> None:
        """Shards taken out of the mesh (their segments gone): no step or plan reaches them."""
        self.engine.exchange.remove_shards(set(indices))
        self.shards.remove(set(indices))

    async def _move(self, record: ContextRecord, i: int, dst: int) -> bool:
        """Segment `i` of a stored context onto shard `dst` (see the module docstring)."""
        cid, seg = record.info.id, record.segments[i]
        summaries = await call(self.shards[dst], "open", cid, record.files[i], seg.start, seg.end,
                               timeout_s=MOVE_TIMEOUT_S)
        return await self._switch(record, i, dst, summaries)

    async def _switch(self, record: ContextRecord, i: int, dst: int, summaries: list) -> bool:
        """Requests from now on plan segment `i` on `dst` (which opened it); the old shard lets go
        once those begun before have finished."""
        cid, seg = record.info.id, record.segments[i]
        if record.dropped:  # while the target opened it: let go there too
            tell(self.shards[dst], "drop", cid)
            return False
        self.contexts.move(record, {i: dst}, opened={i: summaries})  # requests begun before keep the old shard's
        if self.catalog is not None and record.info.stored:  # a restarted router, and every other mesh on the store, read it there
            await asyncio.to_thread(self.catalog.relocate, cid, list(record.info.shards))
        await self.directory.spread()  # the mesh's other routers read it there before the old shard lets go
        self.retiring.moved(record, seg.shard)
        return True


USAGE_TIMEOUT_S = 2.0  # a shard's pool usage for the pool map: a busy or lost shard shows without it


async def _usage(shard: Any) -> dict | None:
    if isinstance(shard, ray.actor.ActorHandle):  # (an in-process shard answers at once)
        try:
            return await asyncio.wait_for(shard.pool_usage.remote(), USAGE_TIMEOUT_S)
        except (asyncio.TimeoutError, ray.exceptions.RayError):
            return None
    return shard.pool_usage()


async def _nothing() -> None:
    return None
