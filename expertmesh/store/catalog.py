"""The catalog of stored contexts: manifests over segment files, with reuse and clean-up.

`Catalog.open(location, fingerprint, model)` binds the store to the model (refusing a store
written by other weights), removes what interrupted writes left behind (scratch files,
segment files no manifest names) and reads every manifest. A manifest that cannot be read is
reported in `unavailable` by file name; every other context stays usable.
"""

from __future__ import annotations

import hashlib

import numpy as np

from expertmesh.store.location import StoreLocation
from expertmesh.store.manifest import Manifest, SegmentEntry


def tokens_sha256(token_ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(token_ids, dtype=np.int64).tobytes()).hexdigest()


class Catalog:
    def __init__(self, location: StoreLocation, fingerprint: str) -> None:
        self.location, self.fingerprint = location, fingerprint
        self.manifests: dict[str, Manifest] = {}
        self.unavailable: dict[str, str] = {}  # context id -> why

    @classmethod
    def open(cls, location: str, fingerprint: str, model: dict) -> "Catalog":
        loc = StoreLocation(location)
        loc.bind(fingerprint, model)
        cat = cls(loc, fingerprint)
        cat.reload()
        cat.removed_orphans = cat.clean_orphans()
        return cat

    def reload(self) -> None:
        self.manifests.clear()
        self.unavailable.clear()
        for name in self.location.list("contexts"):
            if not name.endswith(".json"):
                continue
            cid = name[:-len(".json")]
            raw = self.location.read_bytes(f"contexts/{name}")
            try:
                m = Manifest.from_json(raw or b"", f"{self.location.uri}/contexts/{name}")
            except ValueError as exc:
                self.unavailable[cid] = str(exc)
                continue
            if m.model_fingerprint != self.fingerprint:
                self.unavailable[cid] = (f"stored context {cid} was computed by another model "
                                         f"({m.model_fingerprint[:16]}...)")
                continue
            self.manifests[m.id] = m

    def clean_orphans(self) -> int:
        """Remove scratch files and segment files that no manifest names."""
        n = self.location.clean_scratch()
        named = {s.file for m in self.manifests.values() for s in m.segments}
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

    def remove(self, context_id: str) -> list[str]:
        """Forget a context (manifest first); returns its segment files no other context uses."""
        m = self.manifests.pop(context_id, None)
        self.location.delete(f"contexts/{context_id}.json")
        self.unavailable.pop(context_id, None)
        if m is None:
            return []
        still = {s.file for other in self.manifests.values() for s in other.segments}
        files = [s.file for s in m.segments if s.file not in still]
        for f in files:
            self.location.delete(f"segments/{f}")
        return files

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
