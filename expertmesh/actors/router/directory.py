"""The context directory as a router sees it: what contexts exist, kept in step with the mesh's
other routers and with every other mesh on the same store.

Durable truth is the store's manifests (store/catalog.py); without a store, the shards' own
description of the segments they hold. On top of it, each router's contexts (contexts.py)
publish every change as a snapshot with an id (long_poll.py), and the router follows each of
the mesh's other routers the way Ray Serve's replicas follow its controller: it asks "anything
newer than id N?" (`directory_changes`) and is answered when something changes; a router that
restarts asks again from nothing and gets all. Event-driven, no re-reading:
- a context registered, dropped, or a segment moved through one router is listed, refused, or
  read from its new shard by the mesh's other running routers before that call returns
  (`spread`: bounded by TELL_TIMEOUT_S for a router that does not take it up);
- an id a router does not know is looked up in the store at once (without a store: in the
  shards), so a context registered through any mesh is answered as soon as its registration
  returns;
- while this mesh is the only one on the store, the manifests are not re-read at all.
Bounded, where the store cannot tell: another mesh (another Ray cluster) on the same store is
seen only by re-reading it (an object store sends no notices; a network file system's are
local to each host). While another mesh's member lease is live (store/members.py) each router
re-reads the manifests every SYNC_S, so what that mesh registers, drops or moves is seen here
within SYNC_S; a mesh that starts is noticed within RENEW_S (its lease). Each round also renews
this router's lease and collects dropped files (their files outlive a drop by GRACE_S while
other members are live, so a request never reads deleted files).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray

from expertmesh.actors.names import actor_name, lookup, mesh_of
from expertmesh.actors.router.contexts import Contexts, Entry, record_of
from expertmesh.actors.router.long_poll import LISTEN_S, NOTHING, Snapshot
from expertmesh.actors.router.retire import Retiring
from expertmesh.actors.router.shards import Shards
from expertmesh.dataplane.calls import call
from expertmesh.dataplane.liveness import down
from expertmesh.errors import ContextNotFound
from expertmesh.store.catalog import SYNC_S, Catalog
from expertmesh.store.members import RENEW_S
from expertmesh.store.registry import ContextInfo, ContextRecord, Segment

log = logging.getLogger("expertmesh.directory")
TELL_TIMEOUT_S = 5.0  # a change waits this long at most for the mesh's other routers to take it up
FENCE_TIMEOUT_S = 3600.0  # a dropped context's segments wait this long at most for other routers' requests
FENCE_POLL_S = 0.2
FOLLOW_RETRY_S = (0.05, 2.0)  # a router that cannot be asked is asked again after this, doubling
HELD_TIMEOUT_S = 10.0  # the shards' own description of what they hold (no store)


class Directory:
    def __init__(self, contexts: Contexts, shards: Shards, catalog: Catalog | None, retiring: Retiring,
                 name: str | None, routers: int) -> None:
        """name: this router's actor name (None in process: no other routers); routers: how
        many the mesh has (they are found by name)."""
        self.contexts, self.shards, self.catalog, self.retiring = contexts, shards, catalog, retiring
        self.name = name or ""
        mesh = mesh_of(name)
        self.siblings = [] if mesh is None else [n for n in (actor_name(mesh, None, i) for i in range(routers))
                                                  if n != name]
        self._handles: dict[str, Any] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._others = True  # another mesh is live on the store (until the first round says)

    def load(self) -> None:
        """What this router serves at start: the store's manifests (each opened at first use), or
        without a store, the contexts whose every segment its shard still holds."""
        if self.catalog is None:
            self.adopt_from_shards()
            return
        for m in self.catalog.manifests.values():
            self.contexts.serve(record_of(m))

    def start(self) -> None:
        """Follow the mesh's other routers and watch the store, on the running event loop (an
        actor's from its construction; an in-process router's from its first request)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        work = {n: (lambda n=n: self._follow(n)) for n in self.siblings}
        if self.catalog is not None:
            work["store"] = self._watch_store
        for key, start in work.items():
            task = self._tasks.get(key)
            if task is None or task.done():
                self._tasks[key] = loop.create_task(start())

    def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()

    # -- the mesh's other routers -------------------------------------------------------------
    async def changes(self, listener: str, held: tuple[str, int]) -> Snapshot:
        """What changed here since `held`, for another router (answered when there is some)."""
        return await self.contexts.published.listen(listener, tuple(held))

    async def spread(self) -> None:
        """Wait until the mesh's other routers that Ray reports alive hold this router's latest
        snapshot (at most TELL_TIMEOUT_S: one that does not is restarting, and asks from nothing
        when it is back). Which are alive is asked of Ray's control store off the event loop."""
        if not self.siblings:
            return
        alive = await asyncio.to_thread(lambda: [n for n, h in list(self._handles.items()) if not down(h)])
        late = await self.contexts.published.settled(alive, TELL_TIMEOUT_S)
        if late:
            log.warning("context directory: routers %s did not take up change %d within %.0f s",
                        late, self.contexts.published.id, TELL_TIMEOUT_S)

    async def quiet(self, context_id: str) -> list[str]:
        """Wait until no other router of the mesh (of those Ray reports alive) runs a request over
        `context_id` (they refuse new ones once `spread` returned): a dropped context's segments
        go only then (the fence of a drop). At most FENCE_TIMEOUT_S; the routers still busy then."""
        if not self.siblings:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FENCE_TIMEOUT_S
        busy = await asyncio.to_thread(lambda: [n for n, h in list(self._handles.items()) if not down(h)])
        while busy and loop.time() < deadline:
            counts = await asyncio.gather(*(call(self._handles[n], "running_over", context_id) for n in busy),
                                          return_exceptions=True)
            busy = [n for n, c in zip(busy, counts) if isinstance(c, int) and c > 0]  # a lost router runs nothing
            if busy:
                await asyncio.sleep(FENCE_POLL_S)
        if busy:
            log.warning("context directory: routers %s still ran requests over dropped context %s after %.0f s",
                        busy, context_id, FENCE_TIMEOUT_S)
        return busy

    async def _follow(self, name: str) -> None:
        """Ask router `name` what changed since the snapshot held, apply it, ask again."""
        held, pause = NOTHING, FOLLOW_RETRY_S[0]
        while True:
            try:
                handle = self._handles.get(name)
                if handle is None:
                    handle = self._handles[name] = (await asyncio.to_thread(lookup, [name]))[0]
                snap = await call(handle, "directory_changes", self.name, held, timeout_s=2 * LISTEN_S[1])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - not up yet, restarting or gone: asked again
                log.debug("context directory: %s did not answer (%s)", name, exc)
                await asyncio.sleep(pause)
                pause = min(2 * pause, FOLLOW_RETRY_S[1])
                continue
            pause = FOLLOW_RETRY_S[0]
            self.apply(snap.values)
            held = snap.held

    def apply(self, entries: tuple[Entry, ...]) -> None:
        """What another router of the mesh registered, dropped or moved (or learned)."""
        for e in entries:
            record = self.contexts.get(e.id)
            if e.dropped is not None:
                if record is not None and e.info is not None and record.info.created > e.info.created:
                    continue  # registered again here since
                dropped = self.contexts.drop(e.id, e.dropped)
                if self.catalog is not None:
                    self.catalog.forget(e.id)
                if dropped is not None:
                    self.retiring.dropped_later(dropped)
            elif record is None and not self.contexts.known(e.id):
                self.contexts.serve(e.record())
                if self.catalog is not None and e.info.stored:  # a candidate for reuse here too
                    asyncio.get_running_loop().run_in_executor(None, _quietly, self.catalog.load, e.id)
            elif record is not None and record.ready and e.moves > record.moves:
                moves = {i: s.shard for i, (s, mine) in enumerate(zip(e.segments, record.segments))
                         if s.shard != mine.shard}
                self._moved(record, moves, e.moves)

    def _moved(self, record: ContextRecord, moves: dict[int, int], count: int | None = None) -> None:
        """Segments moved elsewhere (the new shards open them, or reopen them from the store at
        the first item); the old shards let them go once this router's requests begun before end."""
        for shard in set(self.contexts.move(record, moves, count=count)):
            self.retiring.moved(record, shard)

    # -- the store ----------------------------------------------------------------------------
    async def _watch_store(self) -> None:
        """Renew this router's lease and collect dropped files every round; re-read the manifests
        only while another mesh is live on the store (the rounds come every SYNC_S then, else
        every RENEW_S)."""
        while True:
            try:  # the store's I/O in a thread; the contexts change here, on the event loop
                self._others = await asyncio.to_thread(self.catalog.tend)
                if self._others:
                    self._apply_store(*await asyncio.to_thread(self.catalog.changes, self.contexts.served_stored()))
            except Exception as exc:  # noqa: BLE001 - never let the watch die; the next round retries
                log.warning("context directory: reading store %s failed: %s", self.catalog.location.uri, exc)
            await asyncio.sleep(SYNC_S if self._others else RENEW_S)

    def refresh_if_behind(self) -> None:
        """Re-read the store here, before a lookup or a listing, when the watch fell behind (its
        last read is older than 2 x SYNC_S while another mesh is live) or does not run."""
        if self.catalog is None or not self.catalog.stale(2 * SYNC_S):
            return
        watching = self._tasks.get("store")
        if watching is not None and not watching.done() and not self._others:
            return  # alone on the store: nothing changes there unseen
        try:
            published, removed = self.catalog.sync(self.contexts.served_stored())
        except OSError as exc:  # the store is unreachable for a moment: serve what is known, retry
            log.warning("context directory: sync with %s failed (%s); retrying", self.catalog.location.uri, exc)
            return
        self._apply_store(published, removed)

    def _apply_store(self, published: list, removed: set[str]) -> None:
        """Adopt contexts published by another mesh, follow the segments it moved, refuse from
        now on those it dropped."""
        for m in published:  # (an id dropped here is not taken back from a listing made before the drop)
            record = self.contexts.get(m.id)
            if record is None and not self.contexts.known(m.id):
                self.contexts.serve(record_of(m))
            elif record is not None and record.ready and record.info.stored:
                moves = {i: e.shard for i, (e, s) in enumerate(zip(m.segments, record.segments)) if e.shard != s.shard}
                if moves and len(m.segments) == len(record.segments):
                    self._moved(record, moves)
        for cid in removed:
            record = self.contexts.get(cid)
            if record is None or not record.ready or not record.info.stored:
                continue  # a registration of ours in flight has no manifest yet
            dropped = self.contexts.drop(cid, f"context {cid!r} was dropped (through another mesh on store "
                                              f"{self.catalog.location.uri})")
            self.retiring.dropped_later(dropped)  # its shards let go; the dropping mesh deletes the files

    def clean_store(self) -> dict:
        """Remove dead members' leftovers and collect dropped contexts' files (Mesh.clean_store)."""
        if self.catalog is None:
            return {"removed_orphans": 0, "collected": []}
        return {"removed_orphans": self.catalog.clean_orphans(), "collected": self.catalog.collect()}

    # -- lookups ------------------------------------------------------------------------------
    def record(self, context_id: str) -> ContextRecord:
        """A ready context's record, or ContextNotFound saying why not."""
        self.refresh_if_behind()
        self.lookup(context_id)
        record = self.contexts.get(context_id)
        if record is None or not record.ready:
            why = self.catalog.unavailable.get(context_id) if self.catalog is not None else None
            raise ContextNotFound(why or self.contexts.why_lost(context_id)
                                  or f"context {context_id!r} is not registered")
        return record

    def listing(self) -> list[ContextInfo]:
        self.refresh_if_behind()
        return self.contexts.listing()

    def lookup(self, context_id: str) -> None:
        """An id this router does not know: adopt it if the store has its manifest now (without a
        store, in a mesh of several routers: if the shards hold it)."""
        if self.contexts.known(context_id):
            return
        if self.catalog is None:
            if self.siblings:
                self.adopt_from_shards()
            return
        m = self.catalog.load(context_id)
        if m is not None:
            self.contexts.serve(record_of(m))

    def adopt_from_shards(self, timeout_s: float = HELD_TIMEOUT_S) -> None:
        """Without a store the shards are the directory: the contexts whose every segment its
        shard still holds are served (the shards keep the router's description of each)."""
        if not self.shards.remote():
            return
        refs = [None if down(s) else s.held.remote() for s in self.shards]  # a lost shard holds nothing
        live = [r for r in refs if r is not None]
        ready, _ = ray.wait(live, num_returns=len(live), timeout=timeout_s)
        held: list[dict] = []
        for ref in refs:
            try:
                held.append(ray.get(ref) if ref is not None and ref in ready else {})
            except Exception:  # noqa: BLE001 - a shard that is down holds nothing we can serve
                held.append({})
        for cid, meta in {c: m for h in held for c, m in h.items()}.items():
            if self.contexts.known(cid):  # known here, or dropped (another router's copy may lag)
                continue
            segments = [Segment(*x) for x in meta["segments"]]
            if any(s.shard >= len(held) or cid not in held[s.shard] for s in segments):
                continue  # a segment is gone: the context was lost with its shard
            info = meta["info"]
            record = ContextRecord(ContextInfo(**{**info, "shards": tuple(info["shards"])}), segments)
            record.files = list(meta["files"])
            self.contexts.serve(record)

    async def drop_lost(self) -> dict[str, str]:
        """Without a store: ready contexts with a segment that its shard no longer holds (the
        shard restarted, or Ray reports it not alive: its memory is gone) are dropped; returns
        id -> why, for their requests."""
        records = self.contexts.records()
        if all(r.info.stored or not r.ready for r in records):
            return {}  # stored contexts are reopened from the store: no shard need be asked (a lost one may hang)
        states = [down(s) for s in self.shards]
        # a shard that is back answers in seconds; one that cannot be placed holds nothing we can serve
        held = await asyncio.gather(*(asyncio.sleep(0) if st else call(s, "contexts", timeout_s=HELD_TIMEOUT_S)
                                      for s, st in zip(self.shards, states)), return_exceptions=True)
        lost = {}
        for record in records:
            cid = record.info.id
            if not record.ready or record.info.stored:  # a stored context: its shard reopens it from the store
                continue
            gone = [s.shard for s in record.segments
                    if states[s.shard] or (isinstance(held[s.shard], dict) and cid not in held[s.shard])]
            if gone:
                why = f"Ray reports its actor {states[gone[0]]}" if states[gone[0]] else "the shard restarted"
                lost[cid] = (f"context {cid!r} was lost with context shard {gone[0]}: {why} and the mesh has no store "
                             "to reload it from; register it again")
                dropped = self.contexts.drop(cid, lost[cid])
                if dropped is not None:
                    await self.retiring.dropped(dropped)
        return lost


def _quietly(fn, *args) -> None:
    """For a thread: a best-effort read whose failure costs only a missed reuse."""
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001
        log.debug("context directory: %s failed: %s", getattr(fn, "__name__", fn), exc)
