"""The catalog of stored contexts: manifests over segment files, with reuse and clean-up.

`Catalog.open(location, fingerprint, model, group)` binds the store to the model (refusing a
store written by other weights), takes a member lease (members.py; `group` names the mesh),
removes what dead members' interrupted writes left behind and reads every manifest. A manifest
that cannot be read is reported in `unavailable` by file name; every other context stays usable.

A store may be shared by several meshes at once. What makes that safe:
- a registration writes `pending/<id>.json` (its member, its segment files) before any
  segment file and removes it after the manifest: clean-up never deletes a file a live
  member's registration names, nor its scratch files; a dead member's are removed. Clean-up
  lists what it may delete before it reads what is in use, so a registration that begins
  meanwhile is seen (`clean_orphans`);
- a drop writes `dropped/<id>.json` (its files) before deleting the manifest; the files are
  deleted at once when no other member is live, else by `collect()` after `GRACE_S`, and
  only those no manifest (re-read from the store) or live registration names;
- `changes()` re-reads the manifests: contexts published by another mesh appear, contexts it
  dropped disappear, manifests it rewrote (`relocate`: a rebalance) are read again.

The store sends no change notices (an object store has none; a network file system's are
local to each host), so what another mesh changes is seen only by re-reading: a router does so
every `SYNC_S` while `tend()` finds another mesh's lease live, and not at all while its own
mesh is alone on the store (its routers tell each other: actors/router/directory.py).
"""

from __future__ import annotations

import hashlib
import dataclasses
import json
import time

import numpy as np

from expertmesh.store.location import Stamp, StoreLocation
from expertmesh.store.manifest import Manifest, SegmentEntry
from expertmesh.store.members import Membership

SYNC_S = 2.0  # a router re-reads the directory this often while another mesh is live on the store
STAMP_SLACK_S = 2.0  # an object store's mtime this close to the last listing may hide a same-size rewrite
CLEAN_S = 300.0  # and removes what dead members left this often
GRACE_S = 30.0  # a dropped context's files outlive its manifest this long while other meshes are live


def tokens_sha256(token_ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(token_ids, dtype=np.int64).tobytes()).hexdigest()


class Catalog:
    def __init__(self, location: StoreLocation, fingerprint: str, group: str | None = None) -> None:
        self.location, self.fingerprint = location, fingerprint
        self.manifests: dict[str, Manifest] = {}
        self.unavailable: dict[str, str] = {}  # context id -> why
        self.member = Membership(location, group=group)
        self.synced = self.cleaned = 0.0
        self._stamps: dict[str, Stamp] = {}  # context id -> its manifest's stamp when it was read
        self._listed = 0.0  # wall time of the last listing of contexts/

    @classmethod
    def open(cls, location: str, fingerprint: str, model: dict, group: str | None = None) -> "Catalog":
        """group: the mesh this catalog's router belongs to (its member lease names it)."""
        loc = StoreLocation(location)
        loc.bind(fingerprint, model)
        cat = cls(loc, fingerprint, group)
        cat.member.renew(force=True)
        cat.reload()
        cat.removed_orphans = cat.clean_orphans()
        return cat

    # -- reading the directory ----------------------------------------------------------------
    def _read(self, name: str) -> Manifest | str:
        """The manifest contexts/<name>, or why it cannot be used."""
        cid = name[:-len(".json")]
        raw = self.location.read_bytes(f"contexts/{name}")
        if raw is None:
            return f"context {cid!r} is not registered"
        try:
            m = Manifest.from_json(raw, f"{self.location.uri}/contexts/{name}")
        except ValueError as exc:
            return str(exc)
        if m.model_fingerprint != self.fingerprint:
            return f"stored context {cid} was computed by another model ({m.model_fingerprint[:16]}...)"
        return m

    def reload(self) -> None:
        """Bring `manifests` to the store's: one listing with each manifest's stamp; a manifest is
        read when it is new, its stamp changed (`relocate` rewrote it), or its stamp cannot tell
        (an object store's mtime within STAMP_SLACK_S of the previous listing: bounded to the
        manifests written in those seconds)."""
        listed_at = time.time()
        stamps = {n[:-len(".json")]: st for n, st in self.location.stamps("contexts").items() if n.endswith(".json")}
        have, seen = self.manifests, self._stamps
        manifests, unavailable, read = {}, {}, {}
        for cid, stamp in stamps.items():
            if cid in have and seen.get(cid) == stamp and not self._unsure(stamp):
                manifests[cid], read[cid] = have[cid], stamp
                continue
            got = self._read(f"{cid}.json")
            if isinstance(got, str):
                unavailable[cid] = got
            else:
                manifests[got.id], read[got.id] = got, stamp
        # new dicts, assigned whole: a reader in another thread iterates a consistent one
        self.manifests, self.unavailable, self._stamps = manifests, unavailable, read
        self._listed, self.synced = listed_at, time.monotonic()

    def _unsure(self, stamp: Stamp) -> bool:
        """A stamp that may hide a rewrite: no inode, and an mtime missing or too close to the
        previous listing for its resolution."""
        return stamp.inode is None and (stamp.mtime_ns is None or
                                        stamp.mtime_ns / 1e9 >= self._listed - STAMP_SLACK_S)

    def load(self, context_id: str) -> Manifest | None:
        """One context's manifest read from the store now (published by any mesh), or None."""
        got = self._read(f"{context_id}.json")
        if isinstance(got, str):
            if "is not registered" not in got:
                self.unavailable[context_id] = got
            return None
        self.manifests[got.id] = got
        return got

    def forget(self, context_id: str) -> None:
        """A context dropped elsewhere (told by another router of this mesh): no longer a
        candidate for reuse here, before the next read of the directory."""
        self.manifests.pop(context_id, None)
        self._stamps.pop(context_id, None)

    def sync(self, served: set[str] | frozenset = frozenset()) -> tuple[list[Manifest], set[str]]:
        """`tend()`, then `changes(served)`."""
        self.tend()
        return self.changes(served)

    def tend(self) -> bool:
        """Renew this member's lease and delete what drops and dead members left, when due.
        Returns whether another mesh (a live member of another group) uses the store now: only
        then can the manifests change without this mesh's routers knowing."""
        self.member.renew()
        live = self.member.live_groups()
        self.collect()
        if time.monotonic() - self.cleaned >= CLEAN_S:
            self.clean_orphans()
        return any(group != self.member.group for group in live.values())

    def changes(self, served: set[str] | frozenset = frozenset()) -> tuple[list[Manifest], set[str]]:
        """Re-read the manifests; (manifests new or rewritten since the last read, ids no longer
        stored). served: the ids the caller answers: one missing from `manifests` without a drop
        seen here (a `load` racing a `reload` in another thread loses its entry) is read again:
        back if its manifest is in the store, else reported removed, so a drop elsewhere is
        never missed."""
        before = dict(self.manifests)
        self.reload()
        published = [m for cid, m in self.manifests.items() if before.get(cid) != m]
        removed = set(before) - set(self.manifests)
        for cid in set(served) - set(self.manifests) - removed:
            got = self._read(f"{cid}.json")
            if not isinstance(got, str):
                self.manifests[cid] = got
            elif "is not registered" in got:
                removed.add(cid)
        return published, removed

    def stale(self, after_s: float = SYNC_S) -> bool:
        return time.monotonic() - self.synced >= after_s

    def exists(self, context_id: str) -> bool:
        """A manifest or a live member's registration in flight has this id."""
        if self.location.read_bytes(f"contexts/{context_id}.json") is not None:
            return True
        pending = self._pending().get(context_id)
        return pending is not None and pending.get("member") in self.member.live()

    # -- registrations in flight ---------------------------------------------------------------
    def begin_pending(self, context_id: str, files: list[str]) -> None:
        """Announce a registration (before any of its segment files is written)."""
        body = {"member": self.member.id, "files": list(files), "started": time.time()}
        self.location.write_bytes(f"pending/{context_id}.json", json.dumps(body).encode())

    def end_pending(self, context_id: str) -> None:
        self.location.delete(f"pending/{context_id}.json")

    def _pending(self) -> dict[str, dict]:
        out = {}
        for name in self.location.list("pending"):
            try:
                out[name[:-len(".json")]] = json.loads(self.location.read_bytes(f"pending/{name}") or b"")
            except ValueError:
                out[name[:-len(".json")]] = {}
        return out

    def _in_use(self) -> set[str]:
        """Segment files some context or a live member's registration names, read in the order
        that makes a file listed before this call safe: pending entries first (a registration
        writes its entry before any file, and removes it only after its manifest), then the
        members (a member's lease is written before its first entry), then the manifests."""
        pending = self._pending()
        live = self.member.live() | {self.member.id}
        self.reload()
        named = {s.file for m in self.manifests.values() for s in m.segments}
        for cid, p in pending.items():
            if p.get("member") in live:
                named.update(p.get("files", []))
            else:  # a dead member's registration: it never finishes
                self.location.delete(f"pending/{cid}.json")
        return named

    # -- clean-up -------------------------------------------------------------------------------
    def clean_orphans(self) -> int:
        """Remove what dead members' interrupted writes left: their scratch files and segment
        files that no manifest and no live registration names. The candidates are listed before
        what is in use is read (`_in_use`): a registration that begins meanwhile writes its
        files after its pending entry, so none of them is among the candidates unnamed."""
        self.cleaned = time.monotonic()
        scratch, segments = self.location.scratch_files(), self.location.list("segments")
        named = self._in_use()
        n = self.location.clean_scratch(scratch, keep=named)
        unreadable = set(self.unavailable)
        for name in segments:
            if name not in named and name.split(".")[0] not in unreadable:
                self.location.delete(f"segments/{name}")
                n += 1
        return n

    def add(self, manifest: Manifest) -> None:
        """Publish a context: its manifest is the last file written."""
        self.location.write_bytes(f"contexts/{manifest.id}.json", manifest.to_json())
        self.manifests[manifest.id] = manifest

    def relocate(self, context_id: str, shards: list[int]) -> bool:
        """Record where a context's segments live now (a placement hint: any shard can open a
        segment file). Only while the context is published and not dropped anywhere; False if not."""
        m = self.load(context_id)
        if m is None or self.location.read_bytes(f"dropped/{context_id}.json") is not None:
            return False
        self.add(dataclasses.replace(m, segments=tuple(dataclasses.replace(e, shard=s)
                                                       for e, s in zip(m.segments, shards))))
        return True

    def remove(self, context_id: str) -> list[str]:
        """Drop a context: `withdraw` then `release`. Returns the files deleted now."""
        self.withdraw(context_id)
        return self.release(context_id)

    def withdraw(self, context_id: str) -> None:
        """Tombstone (naming its files), then delete the manifest: every mesh stops serving the
        context at its next sync; the files stay until `release` or `collect`."""
        m = self.manifests.pop(context_id, None)
        if m is None:
            m = self.load(context_id)
            self.manifests.pop(context_id, None)
        files = [s.file for s in m.segments] if m is not None else []
        self.location.write_bytes(f"dropped/{context_id}.json",
                                  json.dumps({"dropped": time.time(), "files": files}).encode())
        self.location.delete(f"contexts/{context_id}.json")
        self.unavailable.pop(context_id, None)

    def release(self, context_id: str) -> list[str]:
        """This mesh no longer reads a withdrawn context's files: delete those nothing else names
        now when no other member is live; otherwise `collect()` does after GRACE_S (another mesh
        may still be finishing a request over them). Returns the files deleted now."""
        raw = self.location.read_bytes(f"dropped/{context_id}.json")
        if raw is None:
            return []
        live = self.member.live() | {self.member.id}
        if live - {self.member.id}:
            return []
        try:
            files = list(json.loads(raw).get("files", []))
        except ValueError:
            files = []
        return self._delete_unnamed(context_id, files)

    def _delete_unnamed(self, context_id: str, files: list[str]) -> list[str]:
        named = self._in_use()
        gone = [f for f in files if f not in named]
        for f in gone:
            self.location.delete(f"segments/{f}")
        self.location.delete(f"dropped/{context_id}.json")
        return gone

    def collect(self, grace_s: float = GRACE_S) -> list[str]:
        """Delete the files of contexts dropped more than `grace_s` ago that nothing names now."""
        gone, now = [], time.time()
        for name in self.location.list("dropped"):
            try:
                stone = json.loads(self.location.read_bytes(f"dropped/{name}") or b"")
                due = now - float(stone["dropped"]) >= grace_s
            except (ValueError, KeyError, TypeError):
                stone, due = {"files": []}, True
            if due:
                gone += self._delete_unnamed(name[:-len(".json")], stone.get("files", []))
        return gone

    def close(self) -> None:
        """Leave the store (this mesh's lease ends now rather than in LEASE_TTL_S)."""
        self.member.leave()

    def reusable_segment(self, mode: str, start: int, end: int, tokens: str, prefix: str, kv_dtype: str,
                         page_size: int) -> SegmentEntry | None:
        """A stored segment file whose KV serves tokens [start, end) of a new context: blockwise
        KV depends only on the segment's own tokens and positions; exact KV on all tokens before
        its end too."""
        for m in self.manifests.values():
            if (m.mode, m.kv_dtype, m.page_size) != (mode, kv_dtype, page_size):
                continue
            for e in m.segments:
                if (e.start, e.end) == (start, end) and (e.prefix_sha256 == prefix if mode == "exact"
                                                         else e.tokens_sha256 == tokens):
                    return e
        return None
