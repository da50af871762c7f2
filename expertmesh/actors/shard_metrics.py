"""A context shard's Ray metrics, set every `FLUSH_S` by a daemon thread of the shard actor
(an in-process shard records none): the KV cache it holds by tier (hot pages in its memory
pool, segment files in the store or its scratch directory), its hot-page budget, the context
tokens it holds, and the pages its attention read from each tier. Labelled by the shard's
index and its mesh (the router actors' mesh name)."""

from __future__ import annotations

import threading
from typing import Any

from ray.util import metrics

FLUSH_S = 2.0


class ShardMetrics:
    def __init__(self, shard: Any, mesh: str) -> None:
        self.shard = shard
        keys = ("mesh", "shard")
        self.pool_bytes = metrics.Gauge("expertmesh_kv_pool_bytes",
                                        "KV cache a context shard holds, by tier: memory (hot pages in its page "
                                        "pool) and store (its segment files)", tag_keys=(*keys, "tier"))
        self.capacity = metrics.Gauge("expertmesh_kv_pool_capacity_bytes",
                                      "a context shard's hot-page budget (memory tier)", tag_keys=keys)
        self.tokens = metrics.Gauge("expertmesh_context_shard_tokens", "context tokens whose KV a shard holds",
                                    tag_keys=keys)
        self.reads = metrics.Counter("expertmesh_context_pages_read_total",
                                     "KV pages a context shard's attention read, by tier: memory (the page pool) "
                                     "or store (a segment file)", tag_keys=(*keys, "tier"))
        self.tags = {"mesh": mesh, "shard": str(shard.index)}
        self._read = {"memory": 0, "store": 0}
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True, name="expertmesh-shard-metrics").start()

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_S):
            self.flush()

    def flush(self) -> None:
        pool = self.shard.pool_usage()
        for tier in ("memory", "store"):
            self.pool_bytes.set(pool[f"{tier}_bytes"], {**self.tags, "tier": tier})
            new = pool["pages_read"].get(tier, 0) - self._read[tier]
            if new > 0:
                self.reads.inc(new, {**self.tags, "tier": tier})
                self._read[tier] += new
        if pool["memory_budget_bytes"] is not None:
            self.capacity.set(pool["memory_budget_bytes"], self.tags)
        self.tokens.set(pool["tokens"], self.tags)

    def close(self) -> None:
        self._stop.set()
