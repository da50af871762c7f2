"""ContextShard: holds the KV of token ranges of registered contexts, for every layer.

Queries come to the KV (never the reverse): `attend` takes a batch of queries per context
and returns (partial output, log-sum-exp) per query over this shard's keys, which the router
merges exactly with the other parts. Per-page key summaries (element-wise min/max of keys
per page, as in Quest) let the router choose shards and pages without touching the KV.

The class is plain Python; `RemoteContextShard` is the Ray actor of it.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter

import warnings

import numpy as np
import ray
import torch

from expertmesh.errors import CapacityError, ContextNotFound
from expertmesh.model.attention import AttentionSpec, partial_attention


@dataclasses.dataclass
class AttendItem:
    """The queries of one or more requests over one context: q [T, Hq, D], positions [T]."""

    context_id: str
    q: np.ndarray
    q_pos: np.ndarray
    visits: dict[str, int]  # request id -> query tokens in this item
    pages: np.ndarray | None = None  # page indices of this shard's segment; None: all


@dataclasses.dataclass
class _Stored:
    k: list[torch.Tensor]  # [layer] -> [T, Hkv, D]
    v: list[torch.Tensor]
    pos: torch.Tensor  # [T]
    kmin: list[torch.Tensor]  # [layer] -> [P, Hkv, D]
    kmax: list[torch.Tensor]

# Arrays from Ray's object store are read-only views; these modules only read them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


class ContextShard:
    def __init__(self, index: int, specs: list[AttentionSpec], capacity_tokens: int, page_size: int = 64,
                 num_threads: int | None = None) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.index, self.specs = index, specs
        self.capacity_tokens, self.page_size = capacity_tokens, page_size
        self._ctx: dict[str, _Stored] = {}
        self.visits: Counter[str] = Counter()  # request id -> query tokens served (recent)
        self.calls = 0
        # a compiled graph runs attend_cg on its own thread, beside store/drop/stats
        self._lock = threading.RLock()

    def ping(self) -> int:
        return self.index

    def used_tokens(self) -> int:
        with self._lock:
            return sum(len(s.pos) for s in self._ctx.values())

    def store(self, context_id: str, k: list[np.ndarray], v: list[np.ndarray], pos: np.ndarray
              ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Keep the KV of a segment (k/v per layer [T, Hkv, D]); return its page summaries."""
        t = len(pos)
        free = self.capacity_tokens - self.used_tokens()
        if t > free:
            raise CapacityError(
                f"context shard {self.index}: segment of {t:,} tokens does not fit; "
                f"{free:,} of {self.capacity_tokens:,} tokens free"
            )
        ks = [torch.from_numpy(np.array(x)) for x in k]
        vs = [torch.from_numpy(np.array(x)) for x in v]
        kmin, kmax = [], []
        for kl in ks:
            pages = self._paged(kl)  # [P, ps, Hkv, D] padded with the page's own first key
            kmin.append(pages.amin(dim=1))
            kmax.append(pages.amax(dim=1))
        with self._lock:
            self._ctx[context_id] = _Stored(ks, vs, torch.from_numpy(np.array(pos)).long(), kmin, kmax)
        return [x.numpy() for x in kmin], [x.numpy() for x in kmax]

    def _paged(self, k: torch.Tensor) -> torch.Tensor:
        t, ps = k.shape[0], self.page_size
        n = -(-t // ps)
        pad = n * ps - t
        if pad:
            k = torch.cat([k, k[-1:].expand(pad, *k.shape[1:])])
        return k.view(n, ps, *k.shape[1:])

    def drop(self, context_id: str) -> bool:
        with self._lock:
            return self._ctx.pop(context_id, None) is not None

    def contexts(self) -> dict[str, int]:
        with self._lock:
            return {c: len(s.pos) for c, s in self._ctx.items()}

    def attend(self, layer: int, items: list[AttendItem]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Partial attention of each item's queries over this shard's keys of its context.

        Returns per item (out [T, Hq, D], lse [T, Hq]) as fp32 numpy.
        """
        with self._lock:
            return self._attend(layer, items)

    def attend_cg(self, payload: tuple) -> list[tuple[np.ndarray, np.ndarray]]:
        """`attend` in a compiled graph: payload (layer, ((context_id, q, q_pos, visits), ...)) or ()."""
        if not payload:
            return []
        layer, items = payload
        return self.attend(layer, [AttendItem(*item) for item in items])

    def _attend(self, layer: int, items: list[AttendItem]) -> list[tuple[np.ndarray, np.ndarray]]:
        self.calls += 1
        out = []
        for item in items:
            stored = self._ctx.get(item.context_id)
            if stored is None:
                raise ContextNotFound(f"context {item.context_id!r} has no segment on shard {self.index}")
            k, v, pos = stored.k[layer], stored.v[layer], stored.pos
            if item.pages is not None:
                rows = self._page_rows(item.pages, len(pos))
                k, v, pos = k[rows], v[rows], pos[rows]
            o, lse = partial_attention(torch.from_numpy(item.q), torch.from_numpy(item.q_pos), k, v, pos,
                                       self.specs[layer])
            self.visits.update(item.visits)
            out.append((o.numpy(), lse.numpy()))
        if len(self.visits) > 100_000:  # bounded memory for a long-running shard
            self.visits = Counter(dict(self.visits.most_common(50_000)))
        return out

    def _page_rows(self, pages: np.ndarray, t: int) -> torch.Tensor:
        p = torch.as_tensor(pages, dtype=torch.int64)
        rows = (p[:, None] * self.page_size + torch.arange(self.page_size)[None]).reshape(-1)
        return rows[rows < t]

    def stats(self) -> dict:
        with self._lock:
            return {"index": self.index, "calls": self.calls, "contexts": self.contexts(),
                    "used_tokens": self.used_tokens(), "capacity_tokens": self.capacity_tokens,
                    "visits": dict(self.visits)}


RemoteContextShard = ray.remote(ContextShard)
