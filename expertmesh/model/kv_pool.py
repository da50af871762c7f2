"""The router's own KV of its running requests in one paged pool (vLLM's paged KV, for the
tokens a request adds: its prompt and what it generates; context KV lives in the shards).

A step appends every request's new K/V rows of a layer in one `index_copy_`, and the batched
decode attention reads every request's keys in one gather, instead of one copy per request and
layer (the router's per-request cost at batch 16 on CPU). Pages of `PAGE` tokens; page 0 is a
null page (zero K/V, positions never visible) that pads ragged batches. A request's pages go
back to the pool when its `SeqKV` is collected; an idle pool above its first size lets its
memory go.
"""

from __future__ import annotations

import threading
import weakref

import torch

PAGE = 16
FIRST_PAGES = 64
NEVER = 1 << 62  # the null page's positions: above every query position


class KVPool:
    """Per layer k/v [slots, Hkv, D] and positions [slots]; slots = pages x PAGE."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self._lock = threading.Lock()  # allocation, growth and writes (step loops may run in threads)
        self._returned: list[int] = []  # pages of collected sequences, taken back at the next append
        self._last_padded: tuple | None = None  # (sequences, their lengths, the padded slot index)
        self._reset(FIRST_PAGES)

    def _reset(self, pages: int) -> None:
        self._k: list[torch.Tensor | None] = [None] * self.num_layers
        self._v: list[torch.Tensor | None] = [None] * self.num_layers
        self._pos: list[torch.Tensor | None] = [None] * self.num_layers
        self.pages = pages
        self._free = list(range(pages - 1, 0, -1))  # page 0: the null page

    def handle(self) -> "SeqKV":
        return SeqKV(self)

    @property
    def used_pages(self) -> int:
        return self.pages - 1 - len(self._free)

    # -- pages ------------------------------------------------------------------------------
    def _take(self, n: int) -> list[int]:
        if len(self._free) < n:
            self._grow(max(self.pages * 2, self.pages + n + 1))
        return [self._free.pop() for _ in range(n)]

    def _give_back(self, pages: list[int]) -> None:
        """A sequence's finalizer (any thread, any time, even under the lock): no lock taken."""
        self._returned.extend(pages)

    def _collect(self) -> None:
        """Returned pages back to the free list (lock held); an idle pool lets a burst's memory go."""
        while self._returned:
            self._free.append(self._returned.pop())
        if self.used_pages == 0 and self.pages > FIRST_PAGES:
            self._reset(FIRST_PAGES)

    def _grow(self, pages: int) -> None:
        slots, old = pages * PAGE, self.pages * PAGE
        for store in (self._k, self._v, self._pos):
            for layer, t in enumerate(store):
                if t is not None:
                    grown = self._blank(t, slots)
                    grown[:old] = t
                    store[layer] = grown
        self._free.extend(range(pages - 1, self.pages - 1, -1))
        self.pages = pages

    @staticmethod
    def _blank(like: torch.Tensor, slots: int) -> torch.Tensor:
        if like.dtype == torch.int64:
            return torch.full((slots,), NEVER, dtype=torch.int64, device=like.device)
        return torch.zeros((slots, *like.shape[1:]), dtype=like.dtype, device=like.device)

    def _layer(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        if self._k[layer] is None:
            slots = self.pages * PAGE
            self._k[layer], self._v[layer], self._pos[layer] = (self._blank(t, slots) for t in (k, v, pos))

    # -- rows -------------------------------------------------------------------------------
    def append(self, layer: int, seqs: list["SeqKV"], counts: list[int], k: torch.Tensor, v: torch.Tensor,
               pos: torch.Tensor) -> None:
        """Rows k/v [sum(counts), Hkv, D] at positions [sum(counts)]: `counts[i]` new tokens of
        seqs[i], back to back, written after what each holds at this layer."""
        with self._lock:
            self._collect()
            self._layer(layer, k, v, pos.to(device=k.device, dtype=torch.int64))
            index = torch.cat([s._reserve(layer, n) for s, n in zip(seqs, counts)]).to(k.device)
            self._k[layer].index_copy_(0, index, k.to(self._k[layer].dtype))
            self._v[layer].index_copy_(0, index, v.to(self._v[layer].dtype))
            self._pos[layer].index_copy_(0, index, pos.to(k.device))

    def padded(self, layer: int, seqs: list["SeqKV"]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every sequence's k/v [B, L, Hkv, D] and positions [B, L] at this layer, padded with
        the null page (zeros, never visible) to the longest."""
        lens = tuple(s.lens[layer] for s in seqs)
        last = self._last_padded  # a decode step's layers read the same slots: the index once per step
        if last is not None and last[1] == lens and len(last[0]) == len(seqs) and \
                all(ref() is s for ref, s in zip(last[0], seqs)):
            index = last[2]
        else:
            index = torch.nn.utils.rnn.pad_sequence([s._slots[:n] for s, n in zip(seqs, lens)], batch_first=True)
            self._last_padded = (tuple(weakref.ref(s) for s in seqs), lens, index)  # keeps no request alive
        with self._lock:
            k, v, pos = self._k[layer], self._v[layer], self._pos[layer]
        index = index.to(k.device)
        return k[index], v[index], pos[index]


class SeqKV:
    """One request's KV in a pool: the same interface as KVCache (append, get, truncate, len)."""

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self.lens = [0] * pool.num_layers
        self._pages: list[int] = []
        self._slots = torch.zeros(0, dtype=torch.int64)
        weakref.finalize(self, pool._give_back, self._pages)

    def _reserve(self, layer: int, n: int) -> torch.Tensor:
        """Slots of the next n tokens at this layer (pages taken as needed; pool lock held)."""
        a = self.lens[layer]
        need = -(-(a + n) // PAGE) - len(self._pages)
        if need > 0:
            new = self.pool._take(need)
            self._pages.extend(new)
            fresh = (torch.tensor(new, dtype=torch.int64)[:, None] * PAGE + torch.arange(PAGE)).reshape(-1)
            self._slots = torch.cat([self._slots, fresh])
        self.lens[layer] = a + n
        return self._slots[a:a + n]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        self.pool.append(layer, [self], [k.shape[0]], k, v, pos)

    def truncate(self, tokens: int) -> None:
        """Keep the first `tokens` tokens of every layer (drop a failed step's appends)."""
        self.lens = [min(n, tokens) for n in self.lens]

    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k [T, Hkv, D], v [T, Hkv, D], positions [T]) of this layer (copies)."""
        with self.pool._lock:
            k, v, pos = self.pool._k[layer], self.pool._v[layer], self.pool._pos[layer]
        if k is None:
            raise IndexError(f"layer {layer} holds no tokens yet")
        index = self._slots[:self.lens[layer]].to(k.device)
        return k.index_select(0, index), v.index_select(0, index), pos.index_select(0, index)

    def __len__(self) -> int:
        return self.lens[0]
