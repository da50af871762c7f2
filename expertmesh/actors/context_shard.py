"""ContextShard: holds the KV of token ranges of registered contexts, for every layer.

Queries come to the KV (never the reverse): `attend` takes a batch of queries per context
and returns (partial output, log-sum-exp, pages read) per item over this shard's keys, which
the router merges exactly with the other parts.

Storage is tiered. Each segment is a page file (`expertmesh.store.pages`) in the mesh's
store (or, without one, in a scratch directory of this host that dies with the shard); hot
pages live in a page pool in memory within `memory_bytes` (`expertmesh.store.tiers`), the
rest are read from the file on demand. Exact attention streams every page in blocks of
bounded size; `top_pages=p` reads only the p pages whose key summaries (element-wise
min/max per page, as in Quest) bound q.k highest. A shard that restarts reopens its
segments from the store when a request names them.

The class is plain Python; `RemoteContextShard` is the Ray actor of it.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import tempfile
import threading
import warnings
from collections import Counter

import numpy as np
import ray
import torch

from expertmesh.actors.names import own_mesh
from expertmesh.actors.segment_moves import SegmentMoves
from expertmesh.actors.shard_memory import (  # noqa: F401
    default_pool_bytes,
    host_memory_bytes,
    remove_dead_scratch,
)
from expertmesh.actors.shard_metrics import ShardMetrics
from expertmesh.dataplane.step_worker import StepWorker
from expertmesh.engine.pathway import quest_bound_rows
from expertmesh.engine.step_plan import AttendItem  # noqa: F401 - the request type of `attend`
from expertmesh.errors import CapacityError, ContextNotFound
from expertmesh.model.attention import AttentionSpec, merge_partials, partial_attention
from expertmesh.model.device import resolve_device
from expertmesh.store.location import StoreLocation
from expertmesh.store.pages import KV_DTYPES, PageShape, SegmentFile, StoreCorrupted
from expertmesh.store.tiers import PageTable

STREAM_PAGES = 1024  # pages per block of streamed attention: bounds the memory of one read


@dataclasses.dataclass
class _Open:
    """A segment file this shard has open; several contexts may share one (reused KV)."""

    slot: int  # its id in the page table
    file: SegmentFile
    name: str
    start: int  # position of its first token in the context
    users: int = 1


# Arrays from Ray's object store are read-only views; these modules only read them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def _host(x) -> np.ndarray:
    """A partial as fp32 numpy (what Ray tasks return)."""
    return x.cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


class ContextShard(StepWorker, SegmentMoves):
    BACKEND = "torch"  # what `Mesh.add_shards` starts more of

    def __init__(self, index: int, specs: list[AttentionSpec], capacity_tokens: int | None = None,
                 page_size: int = 64, num_threads: int | None = None, store: str | None = None,
                 memory_bytes: int | None = None, kv_dtype: str = "float32", device: str = "cpu",
                 gpu_share: float | None = None) -> None:
        """store: the mesh's store location (None: a scratch directory, lost with the shard).
        memory_bytes: the hot-page budget (None: `default_pool_bytes`, decided when the pool is
        made: an eighth of host memory, or on a GPU what is free of this actor's share).
        device: where the page pool lives and attention computes (pages are read from the store
        into it); partial outputs and the LSE stay fp32.
        gpu_share: the GPUs this actor asked Ray for (bounds the default budget on a GPU)."""
        self.args = (index, specs, capacity_tokens, page_size, num_threads, store, memory_bytes, kv_dtype, device,
                     gpu_share)  # a shard added later is made alike (`spec`)
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = self.pool_device = self.data_device = resolve_device(device)  # a JAX shard sets its own .device
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
        self.index, self.specs = index, specs
        self.capacity_tokens, self.page_size, self.kv_dtype = capacity_tokens, page_size, kv_dtype
        if memory_bytes is not None and memory_bytes < 1:
            raise ValueError(f"memory_bytes must be >= 1 or None, got {memory_bytes}")
        self.gpu_share = gpu_share
        self.memory_bytes = memory_bytes  # None: decided with the pool (default_pool_bytes)
        self.durable = store is not None
        self._scratch = None
        if store is None:
            remove_dead_scratch()
            self._scratch = tempfile.mkdtemp(prefix=f"expertmesh-shard{index}-{os.getpid()}-")
            atexit.register(shutil.rmtree, self._scratch, True)
        self.location = StoreLocation(store or self._scratch)
        self._ctx: dict[str, _Open] = {}  # context id -> its segment here
        self._files: dict[str, _Open] = {}  # file name -> open segment
        self._writing: dict[str, object] = {}  # context id -> scratch path while being written
        self._meta: dict[str, dict] = {}  # context id -> the router's description of it
        self._next_slot = 0
        self.table: PageTable | None = None  # made with the pool at the first segment
        self._pool: tuple[torch.Tensor, torch.Tensor] | None = None
        self.visits: Counter[str] = Counter()  # request id -> query tokens served (recent)
        self.reads = Counter()  # pages read: "memory" / "store"
        self.calls = 0
        self._page_bytes = 0  # of a page in the pool, K and V (known with the pool)
        self.host = ray.util.get_node_ip_address() if ray.is_initialized() else "local"
        self._lock = threading.RLock()
        mesh = own_mesh()
        self.metrics = ShardMetrics(self, mesh) if mesh else None  # Ray metrics: a shard actor's only

    def ping(self) -> int:
        return self.index

    def spec(self) -> tuple[str, tuple]:
        """(backend, constructor arguments): how to start another shard like this one."""
        return self.BACKEND, self.args

    def used_tokens(self) -> int:
        with self._lock:
            return sum(o.file.num_tokens for o in self._ctx.values())

    # -- writing a segment ------------------------------------------------------------------
    def begin(self, context_id: str, name: str, start: int, end: int, layers: int, heads: int,
              head_dim: int, meta: dict | None = None, latent: bool = False) -> None:
        """Start the segment file of tokens [start, end) of a context. `meta` (what the router
        knows of the context) is kept with it, so a restarted router finds it here (`held`).
        latent: one vector per token and layer that is key and value (MLA; V is not stored)."""
        with self._lock:
            t = end - start
            if self.capacity_tokens is not None:
                free = self.capacity_tokens - self.used_tokens()
                if t > free:
                    raise CapacityError(f"context shard {self.index}: segment of {t:,} tokens does not fit; "
                                        f"{free:,} of {self.capacity_tokens:,} tokens free")
            if context_id in self._ctx:
                raise ValueError(f"context {context_id!r} already has a segment on shard {self.index}")
            shape = PageShape(layers, -(-t // self.page_size), self.page_size, heads, head_dim, self.kv_dtype, latent)
            tmp = self.location.scratch_file(name)
            self._ensure_pool(shape)
            opened = _Open(self._take_slot(shape), SegmentFile.create(tmp, shape, t, start), name, start)
            self._ctx[context_id] = self._files[name] = opened
            self._writing[context_id] = tmp
            if meta is not None:
                self._meta[context_id] = meta

    def append(self, context_id: str, t0: int, k: list[np.ndarray], v: list[np.ndarray], pos: np.ndarray) -> None:
        """Rows of the segment being written: k/v per layer [T, Hkv, D] from context position t0."""
        with self._lock:
            opened = self._ctx.get(context_id)
            if opened is None or context_id not in self._writing:
                raise ContextNotFound(f"context {context_id!r} has no segment being written on shard {self.index}")
            opened.file.write(t0 - opened.start, [torch.from_numpy(np.asarray(x)) for x in k],
                              [torch.from_numpy(np.asarray(x)) for x in v], torch.from_numpy(np.asarray(pos)))

    def finish(self, context_id: str) -> tuple[int, list]:
        """Close the segment file and move it into the store; returns (its bytes, summaries)."""
        with self._lock:
            opened = self._ctx[context_id]
            tmp = self._writing.pop(context_id)
            opened.file.finish()
            opened.file.close()
            self.location.publish(tmp, opened.name)
            opened.file = SegmentFile.open(self.location.segment_path(opened.name))
            return opened.file.nbytes, self._summaries(opened)

    def open(self, context_id: str, name: str, start: int, end: int) -> list:
        """Serve a stored segment (after a restart, or a context reusing stored KV); its summaries."""
        with self._lock:
            return self._summaries(self._open(context_id, name, start, end))

    def _open(self, context_id: str, name: str, start: int, end: int, here: bool = False) -> _Open:
        # here: the file is in this shard's own location, with a store or not (import_segment)
        opened = self._ctx.get(context_id)
        if opened is not None:
            return opened
        if not self.durable and not here:
            raise ContextNotFound(f"context {context_id!r} has no segment on shard {self.index} (this mesh has "
                                  f"no store: the context was lost with the shard's memory)")
        opened = self._files.get(name)
        if opened is not None:
            opened.users += 1
        else:
            try:
                file = SegmentFile.open(self.location.segment_path(name))
            except StoreCorrupted as exc:
                raise ContextNotFound(f"context {context_id!r} is unavailable: {exc}") from None
            if file.num_tokens != end - start:
                raise ContextNotFound(f"context {context_id!r} is unavailable: stored segment file {file.path} "
                                      f"holds {file.num_tokens} tokens; the manifest says {end - start}")
            self._ensure_pool(file.shape)
            opened = _Open(self._take_slot(file.shape), file, name, start)
            self._files[name] = opened
        self._ctx[context_id] = opened
        return opened

    def _summaries(self, opened: _Open) -> list:
        """(kmin, kmax) [P, Hkv, D] per layer that selects pages by summary (no chunk); None elsewhere."""
        f = opened.file
        return [None if spec.chunk_size else (f.kmin[i].copy(), f.kmax[i].copy())
                for i, spec in enumerate(self.specs)]

    def held(self) -> dict[str, dict]:
        """The finished segments here with the router's description of their contexts."""
        with self._lock:
            return {c: m for c, m in self._meta.items() if c in self._ctx and c not in self._writing}

    def drop(self, context_id: str) -> bool:
        """Forget a context here; a scratch segment file goes with it (a store's files are the
        router's to delete, after its manifest)."""
        with self._lock:
            self._meta.pop(context_id, None)
            opened = self._ctx.pop(context_id, None)
            if opened is None:
                return False
            tmp = self._writing.pop(context_id, None)
            opened.users -= 1
            if opened.users == 0:
                self._files.pop(opened.name, None)
                self.table.remove_segment(opened.slot, opened.file.shape.layers)
                path = opened.file.path
                opened.file.close()
                if tmp is not None or not self.durable:
                    path.unlink(missing_ok=True)
            return True

    def contexts(self) -> dict[str, int]:
        with self._lock:
            return {c: o.file.num_tokens for c, o in self._ctx.items()}

    # -- attention ---------------------------------------------------------------------------
    def attend(self, layer: int, items: list[AttendItem]) -> list[tuple[np.ndarray, np.ndarray, dict]]:
        """Partial attention of each item's queries over this shard's keys of its context.

        Returns per item (out [T, Hq, D], lse [T, Hq]) as fp32 numpy, and the pages read
        {"pages": n, "memory": from the pool, "store": from the file}.
        """
        with self._lock:
            return [(_host(o), _host(lse), r) for o, lse, r in self._attend(layer, items)]

    def attend_tensors(self, layer: int, items: list[AttendItem]) -> list[tuple]:
        """`attend` for the collective data plane: items' q may be tensors on this shard's
        device, and the partials stay where they were computed (no trip through host memory)."""
        with self._lock:
            return self._attend(layer, items)

    @torch.no_grad()
    def _attend(self, layer: int, items: list[AttendItem]) -> list:
        self.calls += 1
        out = []
        for item in items:
            opened = self._ctx.get(item.context_id)
            if opened is None:
                if item.segment is None:
                    raise ContextNotFound(f"context {item.context_id!r} has no segment on shard {self.index}")
                opened = self._open(item.context_id, *item.segment)
            spec = self.specs[layer]
            q, q_pos = torch.as_tensor(item.q), torch.from_numpy(np.asarray(item.q_pos))
            pages = self._pages_for(opened, layer, spec, q, q_pos, item.top_pages)
            parts, reads = [], Counter(pages=len(pages))
            queries = self._queries(q, q_pos) if len(pages) else None
            scan = item.top_pages is None and not (spec.chunk_size or spec.window)
            for i in range(0, len(pages), self.stream_pages):
                try:
                    parts.append(self._partial(queries, opened, layer, pages[i:i + self.stream_pages], reads,
                                               scan, spec))
                except StoreCorrupted as exc:  # never wrong output: this context fails, the rest keep working
                    raise ContextNotFound(f"context {item.context_id!r} is unavailable: {exc}") from None
            o, lse = self._merge(parts, q)
            self.visits.update(item.visits)
            self.reads.update({"memory": reads["memory"], "store": reads["store"]})
            out.append((o, lse, dict(reads)))
        if len(self.visits) > 100_000:  # bounded memory for a long-running shard
            self.visits = Counter(dict(self.visits.most_common(50_000)))
        return out

    # The compute of one block of pages: what a backend subclass (`jax_context_shard`) replaces.
    stream_pages = STREAM_PAGES

    def _queries(self, q: torch.Tensor, q_pos: torch.Tensor):
        """The item's queries as this backend computes with them."""
        return q.to(self.pool_device), q_pos.to(self.pool_device)

    def _partial(self, queries, opened: _Open, layer: int, pages: np.ndarray, reads: Counter, scan: bool,
                 spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """(out [T, Hq, D], lse [T, Hq]) of the queries over one block of pages."""
        k, v, k_pos = self._gather(opened, layer, pages, reads, scan)
        return partial_attention(*queries, k, v, k_pos, spec)

    def _merge(self, parts: list, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks' partials merged with LSE: fp32 (out [T, Hq, D], lse [T, Hq]) on the pool's device."""
        if not parts:
            return (torch.zeros(q.shape, dtype=torch.float32, device=self.pool_device),
                    torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=self.pool_device))
        return merge_partials(parts)

    def _quest(self, q: torch.Tensor, kmin: np.ndarray, kmax: np.ndarray) -> torch.Tensor:
        """Quest upper bound of q.k per page [n] over the pages' summaries [n, Hkv, D]."""
        return quest_bound_rows(q.cpu(), torch.from_numpy(kmin), torch.from_numpy(kmax))

    def _pages_for(self, opened: _Open, layer: int, spec: AttentionSpec, q: torch.Tensor, q_pos: torch.Tensor,
                   top_pages: int | None) -> np.ndarray:
        """The pages of this segment the queries can see (and, with top_pages, the best-bounded)."""
        f, ps = opened.file, self.page_size
        written = min(f.written_pages * ps, f.num_tokens)  # rows readable now
        lo_pos, hi_pos = opened.start, opened.start + written  # positions [lo, hi)
        if spec.chunk_size:
            c = spec.chunk_size
            runs = [(ch * c, (ch + 1) * c) for ch in torch.unique(q_pos // c).tolist()]
        elif spec.window:
            runs = [(int(q_pos.min()) - spec.window + 1, int(q_pos.max()) + 1)]
        else:
            runs = [(lo_pos, int(q_pos.max()) + 1)]
        picked = []
        for a, b in runs:
            a, b = max(a, lo_pos), min(b, hi_pos)
            if a < b:
                picked.append(np.arange((a - opened.start) // ps, -(-(b - opened.start) // ps)))
        if len(picked) == 1:
            pages = picked[0]
        else:
            pages = np.unique(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)
        if top_pages is not None and not spec.chunk_size and len(pages) > top_pages:
            score = self._quest(q, f.kmin[layer, pages], f.kmax[layer, pages])  # [n]
            best = torch.topk(score, top_pages).indices.numpy()
            pages = np.sort(pages[best])
        return pages

    def _gather(self, opened: _Open, layer: int, pages: np.ndarray, reads: Counter, scan: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k, v [n*S, Hkv, D] fp32 (views of head-major [Hkv, n*S, D]) and positions of the pages:
        pool hits, the rest from the file."""
        f, ps = opened.file, self.page_size
        shape = f.shape
        (heads, dim), (k_pool, v_pool) = (shape.heads, shape.head_dim), self._pool  # [Hkv, slots, S, D]
        slots = self.table.lookup(opened.slot, layer, pages)  # [n]
        hit = slots >= 0
        n_hit = int(hit.sum())
        reads.update({"memory": n_hit, "store": len(pages) - n_hit})
        if n_hit == len(pages) and len(pages) and int(slots[-1]) - int(slots[0]) == len(pages) - 1 \
                and bool((np.diff(slots) == 1).all()):
            s0 = int(slots[0])  # one run of slots: a view, no copy
            k, v = k_pool[:, s0:s0 + len(pages)].float(), v_pool[:, s0:s0 + len(pages)].float()
        else:
            dev = k_pool.device
            k, v = (torch.empty(heads, len(pages), ps, dim, device=dev) for _ in range(2))
            if n_hit:
                idx, at = torch.from_numpy(slots[hit]).to(dev), torch.from_numpy(hit).to(dev)
                k[:, at], v[:, at] = k_pool[:, idx].float(), v_pool[:, idx].float()
            if n_hit < len(pages):
                miss = pages[~hit]
                km, vm, _ = f.read(layer, miss)  # [m, S, Hkv, D] as stored
                km = km.view(-1, ps, heads, dim).permute(2, 0, 1, 3).to(dev)  # [Hkv, m, S, D]
                vm = vm.view(-1, ps, heads, dim).permute(2, 0, 1, 3).to(dev)
                at = torch.from_numpy(~hit).to(dev)
                k[:, at], v[:, at] = km.float(), vm.float()
                given = self.table.admit(opened.slot, layer, miss, evict=not scan, keep=slots[hit])
                ok = given >= 0
                if ok.any():
                    dst, ok_t = torch.from_numpy(given[ok]).to(dev), torch.from_numpy(ok).to(dev)
                    k_pool[:, dst] = km[:, ok_t].to(k_pool.dtype)
                    v_pool[:, dst] = vm[:, ok_t].to(v_pool.dtype)
        k = k.reshape(heads, -1, dim).transpose(0, 1)  # [n*S, Hkv, D] over head-major memory
        v = k if shape.latent else v.reshape(heads, -1, dim).transpose(0, 1)
        readable = min(f.written_pages * ps, f.num_tokens)
        if len(pages) and int(pages[-1]) - int(pages[0]) == len(pages) - 1:  # one run: positions are a range
            first = int(pages[0]) * ps
            keep = min(len(pages) * ps, readable - first)  # the last page's padding drops out
            rows = torch.arange(opened.start + first, opened.start + first + keep, device=k.device)
            return k[:keep], v[:keep], rows
        rows = torch.from_numpy((pages[:, None] * ps + np.arange(ps)[None]).reshape(-1))
        valid = rows < readable
        if not bool(valid.all()):  # the last page's padding
            keep = valid.to(k.device)
            k, v, rows = k[keep], v[keep], rows[valid]
        return k, v, rows.to(k.device) + opened.start

    # -- the page pool -----------------------------------------------------------------------
    def _ensure_pool(self, shape: PageShape) -> None:
        if self._pool is not None:
            return
        dtype = torch.float32 if self.kv_dtype == "float32" else torch.bfloat16
        per_page = shape.page_size * shape.heads * shape.head_dim * (4 if dtype == torch.float32 else 2)
        if self.memory_bytes is None:
            self.memory_bytes = default_pool_bytes(self.pool_device, self.gpu_share)
        self._page_bytes = len(shape.tensors) * per_page
        slots = max(1, self.memory_bytes // self._page_bytes)
        # head-major: a head's keys over a run of slots are contiguous (token-major interleaves the
        # heads: 3x slower attention over a cold 16K context). Lazily mapped: used slots become resident.
        k = torch.empty(shape.heads, slots, shape.page_size, shape.head_dim, dtype=dtype, device=self.pool_device)
        self._pool = (k, k if shape.latent else torch.empty_like(k))  # latent: the value is the key
        self.table = PageTable(slots)

    def _take_slot(self, shape: PageShape) -> int:
        self._next_slot += 1
        self.table.add_segment(self._next_slot, shape.layers, shape.pages)
        return self._next_slot

    def pool_usage(self) -> dict:
        """This shard's host, the KV cache it holds by tier (bytes), its hot-page budget, its context
        tokens, the pages it read per tier."""
        with self._lock:
            return {"host": self.host, "memory_bytes": (self.table.used if self.table else 0) * self._page_bytes,
                    "store_bytes": sum(o.file.nbytes for o in self._files.values()),
                    "memory_budget_bytes": self.memory_bytes, "tokens": self.used_tokens(),
                    "pages_read": dict(self.reads)}

    def stats(self) -> dict:
        with self._lock:
            table = self.table
            return {"index": self.index, "backend": "torch", "calls": self.calls, "steps_served": self.steps_served, "contexts": self.contexts(),
                    "used_tokens": self.used_tokens(), "capacity_tokens": self.capacity_tokens,
                    "visits": dict(self.visits), "pages_read": dict(self.reads),
                    "pool": {"memory_bytes": self.memory_bytes, "slots": table.slots if table else 0,
                             "used": table.used if table else 0, "hits": table.hits if table else 0,
                             "misses": table.misses if table else 0,
                             "evictions": table.evictions if table else 0},
                    "store": self.location.uri if self.durable else None, "device": str(self.pool_device),
                    **({"cuda_max_memory_allocated_bytes": torch.cuda.max_memory_allocated(self.pool_device)}
                       if self.pool_device.type == "cuda" else {})}


RemoteContextShard = ray.remote(ContextShard)
