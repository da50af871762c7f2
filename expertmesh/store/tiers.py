"""Which pages are hot: the bookkeeping of a shard's page pool (no tensors here).

The pool has `slots` page slots (the shard's byte budget / bytes per page). A page of a
stored segment file and layer is hot when it holds a slot. Lookups, touches and evictions
are vectorised over arrays of pages, so a step that reads thousands of pages costs a few
numpy calls, not a Python loop.

Eviction follows use: pages used once go before pages used again (frequency), older before
newer within each class (recency). A scan (exact attention over a context larger than the
pool) only fills free slots and never evicts, so the pages it cannot keep stream from the
store while the pool keeps what it holds; targeted reads (Quest-selected pages, the pages
of a local-attention chunk) evict.
"""

from __future__ import annotations

import numpy as np


class PageTable:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._slot_of: dict[tuple[int, int], np.ndarray] = {}  # (segment id, layer) -> [P] slot or -1
        self._owner = np.full((slots, 3), -1, dtype=np.int64)  # slot -> (segment id, layer, page)
        self._last = np.zeros(slots, dtype=np.int64)
        self._uses = np.zeros(slots, dtype=np.int64)
        self._free = list(range(slots - 1, -1, -1))  # a stack, highest first: pops give the lowest slots
        self._tick = 0
        self.hits = self.misses = self.evictions = 0

    def add_segment(self, seg: int, layers: int, pages: int) -> None:
        for layer in range(layers):
            self._slot_of[(seg, layer)] = np.full(pages, -1, dtype=np.int64)

    def remove_segment(self, seg: int, layers: int) -> None:
        for layer in range(layers):
            slots = self._slot_of.pop((seg, layer), None)
            if slots is None:
                continue
            held = slots[slots >= 0]
            self._owner[held] = -1
            self._uses[held] = 0
            self._free.extend(held.tolist())
        # back in order (once, after every layer): the next segment gets ascending runs of slots
        # again, so its pages of a layer sit in one run the attention reads as a view (not in
        # reverse: a gather copy)
        self._free.sort(reverse=True)

    def lookup(self, seg: int, layer: int, pages: np.ndarray) -> np.ndarray:
        """Slots of the pages (-1 where not hot); counts them as used."""
        slots = self._slot_of[(seg, layer)][pages]
        hot = slots[slots >= 0]
        self._tick += 1
        self._last[hot] = self._tick
        self._uses[hot] += 1
        self.hits += len(hot)
        self.misses += len(slots) - len(hot)
        return slots

    def admit(self, seg: int, layer: int, pages: np.ndarray, evict: bool, keep: np.ndarray | None = None
              ) -> np.ndarray:
        """Give slots to (not hot) pages: free slots first, then, if `evict`, the coldest
        slots not in `keep`. Returns a slot per page, -1 for pages left out."""
        out = np.full(len(pages), -1, dtype=np.int64)
        n_free = min(len(self._free), len(pages))
        got = [self._free.pop() for _ in range(n_free)]
        if evict and len(got) < len(pages):
            got += self._evict(len(pages) - len(got), keep).tolist()
        got_arr = np.asarray(got, dtype=np.int64)
        out[:len(got_arr)] = got_arr
        if len(got_arr):
            table = self._slot_of[(seg, layer)]
            table[pages[:len(got_arr)]] = got_arr
            self._owner[got_arr] = np.stack([np.full(len(got_arr), seg), np.full(len(got_arr), layer),
                                             pages[:len(got_arr)]], axis=1)
            self._tick += 1
            self._last[got_arr] = self._tick
            self._uses[got_arr] = 1
        return out

    def _evict(self, n: int, keep: np.ndarray | None) -> np.ndarray:
        held = self._owner[:, 0] >= 0
        if keep is not None and len(keep):
            held[keep[keep >= 0]] = False
        cand = np.nonzero(held)[0]
        if len(cand) == 0:
            return cand
        n = min(n, len(cand))
        # once-used pages first (frequency), then oldest (recency)
        order = np.lexsort((self._last[cand], np.minimum(self._uses[cand], 2)))[:n]
        victims = cand[order]
        for seg, layer, page in self._owner[victims].tolist():
            self._slot_of[(seg, layer)][page] = -1
        self._owner[victims] = -1
        self._uses[victims] = 0
        self.evictions += len(victims)
        return victims

    @property
    def used(self) -> int:
        return self.slots - len(self._free)
