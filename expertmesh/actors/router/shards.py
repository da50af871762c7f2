"""The mesh's context shards as one router reaches them: handles in index order (Ray actors, or
in-process objects called directly), grown by `Mesh.add_shards`, None where one was taken out
(`Mesh.remove_shards`: indices are never reused), with Ray's word on which are running. The
router's collaborators share this one list (placement.py grows and shrinks it)."""

from __future__ import annotations

import asyncio
from typing import Any, Iterator

import ray

from expertmesh.dataplane.calls import call
from expertmesh.dataplane.liveness import REMOVED, down

DROP_TIMEOUT_S = 10.0  # a shard letting a segment go


class Shards:
    def __init__(self, handles: list[Any]) -> None:
        self._handles = list(handles)
        self.leaving: set[int] = set()  # being taken out: no new segment goes there

    def __len__(self) -> int:
        return len(self._handles)

    def __getitem__(self, index: int) -> Any:
        return self._handles[index]

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._handles))

    @property
    def handles(self) -> list[Any]:
        return list(self._handles)

    def add(self, handles: list[Any]) -> list[int]:
        """Shards added to the mesh (after the exchange took them in); their indices."""
        first = len(self._handles)
        self._handles = [*self._handles, *handles]
        return list(range(first, len(self._handles)))

    def remove(self, indices: set[int]) -> None:
        """Shards taken out of the mesh (their segments moved off first)."""
        self._handles = [None if i in indices else h for i, h in enumerate(self._handles)]
        self.leaving -= indices

    def remote(self) -> bool:
        """Every shard is a Ray actor (not an in-process object)."""
        return any(h is not None for h in self._handles) and \
            all(isinstance(h, ray.actor.ActorHandle) for h in self._handles if h is not None)

    def running(self) -> list[Any]:
        """Each shard's handle, or None where Ray does not report it alive (liveness.py) or it
        was taken out."""
        return [None if down(h) else h for h in self._handles]

    def absent(self) -> dict[int, str]:
        """Shards that take no new segments: index -> Ray's state, or REMOVED (taken out, leaving)."""
        return {i: st for i, h in enumerate(self._handles)
                if (st := REMOVED if i in self.leaving else down(h))}

    async def drop(self, where: list[tuple[int, str]], timeout_s: float = DROP_TIMEOUT_S) -> None:
        """Shards let segments go: (shard, name) pairs, a context id or a stand-in's alias. Best
        effort: a shard Ray does not report alive holds nothing (it comes back empty)."""
        running = self.running()
        await asyncio.gather(*(call(running[shard], "drop", name, timeout_s=timeout_s) for shard, name in where
                               if shard < len(running) and running[shard] is not None), return_exceptions=True)
