"""JaxContextShard: a context shard that computes with JAX (TPU hosts, or CPU).

The same shard (segment files, page table, Quest selection, streaming in blocks, LSE merge);
only the compute and the page pool differ: the pool is a pair of JAX arrays
[slots, page, Hkv, D] on the actor's JAX device, pages are written into it in place
(donated buffers), and each block of pages is gathered from the pool and attended in one
jitted program (`expertmesh.jax_backend.attention`). Blocks and queries are padded to a few
bucket sizes so a running mesh compiles each (rows, pages) bucket once per layer kind.

JAX is imported when the shard starts, not when this module is imported: a driver without
JAX can start a mesh whose shard hosts have it.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import ray
import torch

from expertmesh.actors.context_shard import ContextShard, _Open
from expertmesh.jax_backend import bucket, configure_jax
from expertmesh.model.attention import AttentionSpec
from expertmesh.store.pages import PageShape

QUERY_BLOCK = 512  # query rows per program: bounds the [Hq, Tq, Tk] scores with KEY_ROWS
KEY_ROWS = 4096  # key rows per block of pages
POOL_START = 1024  # page slots of the first pool (it doubles, up to the table's slots, as pages come)


class JaxContextShard(ContextShard):
    BACKEND = "jax"

    def __init__(self, *args, **kwargs) -> None:
        self.jax = configure_jax(kwargs.get("num_threads") or (args[4] if len(args) > 4 else None))  # first: fail early
        super().__init__(*args, **kwargs)
        from expertmesh.jax_backend import attention

        self._ja = attention
        self.device = self.jax.devices()[0]
        self.stream_pages = max(1, KEY_ROWS // self.page_size)

    # -- compute -------------------------------------------------------------------------------
    def _queries(self, q: torch.Tensor, q_pos: torch.Tensor) -> list[tuple]:
        """Query blocks padded to bucket rows: [(q [Tb, Hq, D], q_pos int32 [Tb], rows)]."""
        qn, pn = q.numpy().astype(np.float32, copy=False), q_pos.numpy()
        blocks = []
        for a in range(0, len(pn), QUERY_BLOCK):
            n = min(QUERY_BLOCK, len(pn) - a)
            size = bucket(n)
            qb = np.zeros((size, *qn.shape[1:]), np.float32)
            qb[:n] = qn[a:a + n]
            pb = np.full(size, self._ja.PAD_QUERY, np.int32)
            pb[:n] = pn[a:a + n]
            blocks.append((self.jax.device_put(qb, self.device), self.jax.device_put(pb, self.device), n))
        return blocks

    def _partial(self, queries, opened: _Open, layer: int, pages: np.ndarray, reads: Counter, scan: bool,
                 spec: AttentionSpec) -> list:
        """Per query block (out, lse) over one block of pages (device arrays, padded rows)."""
        f, ps, shape = opened.file, self.page_size, opened.file.shape
        slots = self.table.lookup(opened.slot, layer, pages).copy()  # [n]
        hit = slots >= 0
        n_hit = int(hit.sum())
        reads.update({"memory": n_hit, "store": len(pages) - n_hit})
        km = vm = None
        if n_hit < len(pages):
            miss = pages[~hit]
            km, vm, _ = f.read(layer, miss)
            km = km.numpy().reshape(-1, ps, shape.heads, shape.head_dim)
            vm = vm.numpy().reshape(-1, ps, shape.heads, shape.head_dim)
            given = self.table.admit(opened.slot, layer, miss, evict=not scan, keep=slots[hit])
            if (given >= 0).any():
                self._write(given, km, vm)
            slots[~hit] = given
        size = bucket(len(pages), 1)
        rows = pages[:, None] * ps + np.arange(ps)[None]  # [n, S]
        k_pos = np.full((size, ps), self._ja.PAD_KEY, np.int32)
        written = min(f.written_pages * ps, f.num_tokens)
        k_pos[:len(pages)] = np.where(rows < written, rows + opened.start, self._ja.PAD_KEY)
        k_pos = k_pos.reshape(-1)
        if (slots >= 0).all():  # every page in the pool: gathered inside the program
            idx = np.zeros(size, np.int32)
            idx[:len(pages)] = slots
            k_src, v_src = self._pool
        else:  # the pool is full (a scan larger than it): this block is assembled on the host
            idx = np.arange(size, dtype=np.int32)
            k_src = np.zeros((size, ps, shape.heads, shape.head_dim), np.float32)
            v_src = np.zeros_like(k_src)
            pooled = slots >= 0
            if pooled.any():
                at = self.jax.device_put(slots[pooled].astype(np.int32), self.device)
                k_src[:len(pages)][pooled] = np.asarray(self._pool[0][at], dtype=np.float32)
                v_src[:len(pages)][pooled] = np.asarray(self._pool[1][at], dtype=np.float32)
            left = ~pooled & ~hit  # read from the file above, not admitted
            k_src[:len(pages)][left] = km[~pooled[~hit]]
            v_src[:len(pages)][left] = vm[~pooled[~hit]]
        args = self._ja.spec_args(spec)
        return [self._ja.paged_attention(qb, qp, k_src, v_src, idx, k_pos, **args) for qb, qp, _ in queries]

    def _merge(self, parts: list, q: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        if not parts:
            return np.zeros(q.shape, np.float32), np.full(q.shape[:2], -np.inf, np.float32)
        blocks = self._queries_rows(q)
        outs, lses = [], []
        for j, n in enumerate(blocks):
            o, lse = self._ja.merge_partials([p[j] for p in parts])
            outs.append(np.asarray(o)[:n])
            lses.append(np.asarray(lse)[:n])
        return np.concatenate(outs), np.concatenate(lses)

    @staticmethod
    def _queries_rows(q: torch.Tensor) -> list[int]:
        t = q.shape[0]
        return [min(QUERY_BLOCK, t - a) for a in range(0, t, QUERY_BLOCK)]

    def _quest(self, q: torch.Tensor, kmin: np.ndarray, kmax: np.ndarray) -> torch.Tensor:
        t, n = q.shape[0], kmin.shape[0]
        qb = np.zeros((bucket(t), *q.shape[1:]), np.float32)
        qb[:t] = q.numpy()
        size = bucket(n)
        lo = np.zeros((size, *kmin.shape[1:]), np.float32)
        hi = np.zeros_like(lo)
        lo[:n], hi[:n] = kmin, kmax
        return torch.from_numpy(np.asarray(self._ja.quest_bound_rows(qb, lo, hi))[:n].copy())

    # -- the page pool -----------------------------------------------------------------------
    def _ensure_pool(self, shape: PageShape) -> None:
        if self._pool is not None:
            return
        if self.memory_bytes is None and self.device.platform != "cpu":  # an accelerator's memory, not the host's
            stats = self.device.memory_stats() or {}
            if stats.get("bytes_limit"):
                self.memory_bytes = max(1, int(0.9 * (stats["bytes_limit"] - stats.get("bytes_in_use", 0))))
        super()._ensure_pool(shape)  # the table's slots from the byte budget (torch maps nothing yet)
        self._pool = None
        self._dtype = self.jax.numpy.float32 if self.kv_dtype == "float32" else self.jax.numpy.bfloat16
        self._page_shape = (shape.page_size, shape.heads, shape.head_dim)
        self._latent = shape.latent  # MLA: the value is the key, one array serves as both
        self._pool = self._zeros(min(self.table.slots, POOL_START))

    def _zeros(self, slots: int) -> tuple:
        z = self.jax.numpy.zeros((slots, *self._page_shape), self._dtype, device=self.device)
        return (z, z) if self._latent else (z, z.copy())

    def _write(self, given: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """Pages into their given slots (-1: left out); the pool grows (doubling) to hold them."""
        cap = self._pool[0].shape[0]
        need = int(given.max()) + 1
        if need > cap:
            new = min(self.table.slots, max(need, 2 * cap))
            extra = self._zeros(new - cap)
            grown = [self.jax.numpy.concatenate([p, e]) for p, e in zip(self._pool[:1 if self._latent else 2], extra)]
            self._pool = (grown[0], grown[0]) if self._latent else tuple(grown)
            cap = new
        size = bucket(len(given), 1)
        idx = np.full(size, cap, np.int32)  # padding and left-out pages: out of range, dropped
        idx[:len(given)] = np.where(given >= 0, given, cap)
        kp = np.zeros((size, *self._page_shape), np.float32)
        vp = np.zeros_like(kp)
        kp[:len(given)], vp[:len(given)] = k, v
        if self._latent:
            k_pool = self._ja.write_latent_pages(self._pool[0], idx, kp)
            self._pool = (k_pool, k_pool)
        else:
            self._pool = self._ja.write_pages(*self._pool, idx, kp, vp)

    def stats(self) -> dict:
        out = super().stats()
        with self._lock:
            out["backend"] = "jax"
            out["jax"] = {"device": str(self.device), "compilations": self._ja.compilations(),
                          "pool_slots_allocated": 0 if self._pool is None else int(self._pool[0].shape[0])}
        return out


RemoteJaxContextShard = ray.remote(JaxContextShard)
