"""The catalog of stored contexts: manifests over segment files, with reuse and clean-up.

`Catalog.open(location, fingerprint, model)` binds the store to the model (refusing a store
written by other weights), takes a member lease (members.py), removes what dead members'
interrupted writes left behind and reads every manifest. A manifest that cannot be read is
reported in `unavailable` by file name; every other context stays usable.

A store may be shared by several meshes at once. What makes that safe:
- a registration writes `pending/<id>.json` (its member, its segment files) before any
  segment file and removes it after the manifest: clean-up never deletes a file a live
  member's registration names, nor its scratch files; a dead member's are removed;
- a drop writes `dropped/<id>.json` (its files) before deleting the manifest; the files are
  deleted at once when no other member is live, else by `collect()` after `GRACE_S`, and
  only those no manifest (re-read from the store) or live registration names;
- `sync()` re-reads the manifests (every router does it at least every `SYNC_S`): contexts
  published by another mesh appear, contexts it dropped disappear.
"""

from __future__ import annotations

import hashlib
import dataclasses
import json
import time

import numpy as np

from expertmesh.store.location import StoreLocation
from expertmesh.store.manifest import Manifest, SegmentEntry
from expertmesh.store.members import Membership

SYNC_S = 2.0  # a mesh re-reads the directory at least this often while it serves
CLEAN_S = 300.0  # and removes what dead members left this often
GRACE_S = 30.0  # a dropped context's files outlive its manifest this long while other meshes are live


def tokens_sha256(token_ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(token_ids, dtype=np.int64).tobytes()).hexdigest()


class Catalog:
    def __init__(self, location: StoreLocation, fingerprint: str) -> None:
        self.location, self.fingerprint = location, fingerprint
        self.manifests: dict[str, Manifest] = {}
        self.unavailable: dict[str, str] = {}  # context id -> why
        self.member = Membership(location)
        self.synced = self.cleaned = 0.0

    @classmethod
    def open(cls, location: str, fingerprint: str, model: dict) -> "Catalog":
        loc = StoreLocation(location)
        loc.bind(fingerprint, model)
        cat = cls(loc, fingerprint)
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
        """Bring `manifests` to the store's: one listing; only new names are read (a manifest is
        written once and never changed, so a known name needs no second read)."""
        listed = {n[:-len(".json")]: n for n in self.location.list("contexts") if n.endswith(".json")}
        have = self.manifests
        manifests = {cid: m for cid, m in have.items() if cid in listed}
        unavailable = {}
        for cid, name in listed.items():
            if cid in manifests:
                continue
            got = self._read(name)
            if isinstance(got, str):
                unavailable[cid] = got
            else:
                manifests[got.id] = got
        # new dicts, assigned whole: a reader in another thread iterates a consistent one
        self.manifests, self.unavailable = manifests, unavailable
        self.synced = time.monotonic()

    def load(self, context_id: str) -> Manifest | None:
        """One context's manifest read from the store now (published by any mesh), or None."""
        got = self._read(f"{context_id}.json")
        if isinstance(got, str):
            if "is not registered" not in got:
                self.unavailable[context_id] = got
            return None
        self.manifests[got.id] = got
        return got

    def sync(self, served: set[str] | frozenset = frozenset()) -> tuple[list[Manifest], set[str]]:
        """Renew this member's lease, re-read the manifests; (new manifests, ids no longer stored).
        served: the ids the caller answers: one missing from `manifests` without a drop seen here
        (a `load` racing a `reload` in another thread loses its entry) is read again: back if its
        manifest is in the store, else reported removed, so a drop elsewhere is never missed.
        Also deletes what drops and dead members left, when due."""
        self.member.renew()
        before = dict(self.manifests)
        self.reload()
        self.collect()
        if time.monotonic() - self.cleaned >= CLEAN_S:
            self.clean_orphans()
        added = [m for cid, m in self.manifests.items() if cid not in before]
        removed = set(before) - set(self.manifests)
        for cid in set(served) - set(self.manifests) - removed:
            got = self._read(f"{cid}.json")
            if not isinstance(got, str):
                self.manifests[cid] = got
            elif "is not registered" in got:
                removed.add(cid)
        return added, removed

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

    def _in_use(self, live: set[str]) -> set[str]:
        """Segment files some context (re-read from the store) or a live registration names."""
        self.reload()
        named = {s.file for m in self.manifests.values() for s in m.segments}
        for cid, p in self._pending().items():
            if p.get("member") in live:
                named.update(p.get("files", []))
            else:  # a dead member's registration: it never finishes
                self.location.delete(f"pending/{cid}.json")
        return named

    # -- clean-up -------------------------------------------------------------------------------
    def clean_orphans(self) -> int:
        """Remove what dead members' interrupted writes left: their scratch files and segment
        files that no manifest and no live registration names."""
        self.cleaned = time.monotonic()
        live = self.member.live() | {self.member.id}
        named = self._in_use(live)
        n = self.location.clean_scratch(keep=named)
        unreadable = set(self.unavailable)
        for name in self.location.list("segments"):
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
        return self._delete_unnamed(context_id, files, live)

    def _delete_unnamed(self, context_id: str, files: list[str], live: set[str]) -> list[str]:
        named = self._in_use(live)
        gone = [f for f in files if f not in named]
        for f in gone:
            self.location.delete(f"segments/{f}")
        self.location.delete(f"dropped/{context_id}.json")
        return gone

    def collect(self, grace_s: float = GRACE_S) -> list[str]:
        """Delete the files of contexts dropped more than `grace_s` ago that nothing names now."""
        gone, now, live = [], time.time(), None
        for name in self.location.list("dropped"):
            try:
                stone = json.loads(self.location.read_bytes(f"dropped/{name}") or b"")
                due = now - float(stone["dropped"]) >= grace_s
            except (ValueError, KeyError, TypeError):
                stone, due = {"files": []}, True
            if due:
                live = live if live is not None else self.member.live() | {self.member.id}
                gone += self._delete_unnamed(name[:-len(".json")], stone.get("files", []), live)
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
