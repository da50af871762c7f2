"""The context directory as a router sees it: one store shared by every mesh that uses it.

A mixin of the Router. With a store, what a context is lives in the store's manifests
(store/catalog.py), not in one router's memory:
- a lookup of an id this router does not know reads its manifest from the store at once, so a
  context registered through any mesh is answerable here as soon as its registration returns;
- at least every SYNC_S (2 s) while the router runs, and before it lists contexts or serves a
  request when its view is older than that, it re-reads the directory: new contexts appear,
  contexts dropped elsewhere are refused from then on (their files outlive the drop by GRACE_S
  while other meshes are live, so a request never reads deleted files), its member lease is
  renewed and due clean-up runs.
Without a store the shards are the directory: each keeps the router's description of the
segments it holds (`held`), so a router of the same mesh that does not know a context id (one
registered through another router) adopts it from there at its first lookup or listing.

A mesh may have several routers. A context registered through one is listed by the others, and
a drop through one refused by the others, before the call returns (`learn_context`,
`forget_context`: told to each running sibling router; they find each other by name); a
segment moved by `rebalance` through one is read from its new shard by the others from then on
(`learn_move`, placement.py).
"""

from __future__ import annotations

import asyncio
import logging

from expertmesh.actors.names import lookup, mesh_of, own_name, routers_of
from expertmesh.dataplane.calls import call
from expertmesh.dataplane.liveness import down
from expertmesh.store.catalog import SYNC_S

log = logging.getLogger("expertmesh.directory")
TELL_TIMEOUT_S = 5.0


class Directory:
    def _lookup_stored(self, context_id: str) -> None:
        """An id this router does not know: adopt it if the store has its manifest now (without
        a store: if the shards hold it, registered through another router of this mesh)."""
        if context_id in self.contexts or context_id in self.lost:
            return
        if self.catalog is None:
            self._adopt_registered_elsewhere()
            return
        m = self.catalog.load(context_id)
        if m is not None:
            self._adopt(m)

    def _adopt_registered_elsewhere(self) -> None:
        """Without a store, in a mesh of several routers: the contexts the shards hold that this
        router does not know (registered through another router)."""
        if self.catalog is None and self._siblings():
            self._adopt_from_shards()

    def _siblings(self) -> list:
        """This mesh's other routers (handles). A mesh has `spec.routers` routers for its whole
        life and a restarted one keeps its handle, so they are looked up by name once, when all
        are up (not on every register and drop: each lookup is a GCS round trip)."""
        if self._sibling_handles is not None:
            return self._sibling_handles
        own = own_name()
        mesh = mesh_of(own)
        found = lookup([n for n in routers_of(mesh) if n != own]) if mesh is not None and self.spec.routers > 1 else []
        if len(found) == self.spec.routers - 1 or mesh is None:
            self._sibling_handles = found
        return found

    async def _tell_elsewhere(self, method: str, context_id: str, *args) -> None:
        """Tell this mesh's other running routers of a context registered (`learn_context`),
        dropped (`forget_context`) or a segment of it moved (`learn_move`) here. Bounded: one that
        does not answer within TELL_TIMEOUT_S is restarting, and finds it in the store or the
        shards when it is back. Which are running is asked of Ray's control store off the event
        loop (one read per sibling), so the router's step loop does not wait on it."""
        routers = await asyncio.to_thread(lambda: [r for r in self._siblings() if not down(r)])
        await asyncio.gather(*(call(r, method, context_id, *args, timeout_s=TELL_TIMEOUT_S) for r in routers),
                             return_exceptions=True)

    def learn_context(self, context_id: str) -> bool:
        """Another router of this mesh registered a context: list and serve it from now on."""
        self._lookup_stored(context_id)
        return context_id in self.contexts

    def forget_context(self, context_id: str) -> bool:
        """Another router of this mesh dropped a context: refuse it from now on (its segments are
        that router's to drop). Returns whether this router knew it."""
        record = self.contexts.pop(context_id, None)
        self._remember_lost({context_id: f"context {context_id!r} was dropped (through another router)"})
        self.engine.summaries.pop(context_id, None)
        if record is not None:
            record.dropped = True
        return record is not None

    def _sync_directory(self, after_s: float = SYNC_S) -> None:
        """Re-read the store's directory here when this router's view is older than `after_s`
        (the directory loop normally keeps it fresher: it syncs every SYNC_S off the event loop)."""
        if self.catalog is None or not self.catalog.stale(after_s):
            return
        try:
            added, removed = self.catalog.sync(self._served_stored())
        except OSError as exc:  # the store is unreachable for a moment: serve what is known, retry
            log.warning("context directory: sync with %s failed (%s); retrying", self.catalog.location.uri, exc)
            return
        self._apply_directory(added, removed)

    def _served_stored(self) -> frozenset[str]:
        """Ids of the stored contexts this router answers (a snapshot, taken on the event loop)."""
        return frozenset(cid for cid, r in list(self.contexts.items()) if r.ready and r.info.stored)

    def _apply_directory(self, added: list, removed: set[str]) -> None:
        """Adopt contexts published elsewhere; refuse from now on those dropped elsewhere."""
        for m in added:  # (an id dropped here is not taken back from a listing made before the drop)
            if m.id not in self.contexts and m.id not in self.lost:
                self._adopt(m)
        for cid in removed:
            record = self.contexts.get(cid)
            if record is None or not record.ready or not record.info.stored:
                continue  # a registration of ours in flight has no manifest yet
            del self.contexts[cid]
            self.engine.summaries.pop(cid, None)
            record.dropped = True
            self._remember_lost({cid: f"context {cid!r} was dropped (through another mesh on store "
                                      f"{self.catalog.location.uri})"})
            if record.active == 0:  # its shards let go of the files; the dropping mesh deletes them
                self._release_later(record)

    def _release_later(self, record) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        loop.create_task(asyncio.gather(*(call(self.shards[s.shard], "drop", record.info.id)
                                          for s in record.segments if s.shard < len(self.shards)),
                                        return_exceptions=True))

    def clean_store(self) -> dict:
        """Remove dead members' leftovers and collect dropped contexts' files (Mesh.clean_store)."""
        if self.catalog is None:
            return {"removed_orphans": 0, "collected": []}
        return {"removed_orphans": self.catalog.clean_orphans(), "collected": self.catalog.collect()}

    async def _directory_loop(self) -> None:
        """Keep this router's view (and its member lease) fresh while it runs."""
        while True:
            await asyncio.sleep(SYNC_S)
            try:  # the store's I/O in a thread; the router's state changes here, on the event loop
                added, removed = await asyncio.to_thread(self.catalog.sync, self._served_stored())
                self._apply_directory(added, removed)
            except Exception as exc:  # noqa: BLE001 - never let the loop die; the next round retries
                log.warning("context directory: sync failed: %s", exc)
