"""A context shard's side of a segment leaving it for another shard without a store
(`Mesh.remove_shards`, the router's placement.py): the segment file's bytes out, into the other
shard's own location and opened there (checked as any segment file is), and the router's new
description of the context kept by every shard holding a segment of it."""

from __future__ import annotations

from expertmesh.errors import ContextNotFound


class SegmentMoves:
    """ContextShard methods (its lock, open segments, location and descriptions)."""

    def export_segment(self, context_id: str) -> tuple[str, int, int, bytes]:
        """A finished segment held only here (a mesh without a store) as its file's bytes, for a
        peer taking it over (`Mesh.remove_shards`): (file name, start, end, bytes)."""
        with self._lock:
            opened = self._ctx.get(context_id)
            if opened is None or context_id in self._writing:
                raise ContextNotFound(f"context {context_id!r} has no finished segment on shard {self.index}")
            f = opened.file
            return opened.name, opened.start, opened.start + f.num_tokens, f.path.read_bytes()

    def import_segment(self, context_id: str, name: str, start: int, end: int, data: bytes) -> list:
        """Serve a segment another shard exported (its file checked as any when opened); summaries."""
        with self._lock:
            if context_id in self._ctx:
                raise ValueError(f"context {context_id!r} already has a segment on shard {self.index}")
            tmp = self.location.scratch_file(name)
            tmp.write_bytes(data)
            self.location.publish(tmp, name)
            return self._summaries(self._open(context_id, name, start, end, here=True))

    def describe(self, context_id: str, meta: dict) -> None:
        """The router's description of a context held here, anew (its segments moved)."""
        with self._lock:
            if context_id in self._ctx:
                self._meta[context_id] = meta
