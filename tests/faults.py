"""Helpers for fault tests that run as driver scripts (simulated or namespace hosts)."""

import time

import ray

from expertmesh.engine.request import Chunk, Request
from expertmesh.model.sampling import SamplingParams


def greedy_stream(router, prompt: list[int], context_id: str | None, max_new_tokens: int):
    """A greedy request streamed from `router`: its ObjectRefGenerator (Chunks, then the Result)."""
    return router.stream.options(num_returns="streaming").remote(
        Request(prompt, context_id, SamplingParams(max_new_tokens=max_new_tokens)))


def chunk_tokens(item) -> list[int]:
    """A stream item's new tokens (none from its final Result)."""
    return list(item.token_ids) if isinstance(item, Chunk) else []


def wait_until_served_by(mesh, shard: int, context_id: str, poke, timeout_s: float = 120, every_s: float = 0.25) -> float:
    """Call poke() (a request over the context: a shard reopens its segment at its first item)
    until context shard `shard` holds the context again; seconds it took (timeout_s if never)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        poke()
        try:
            if context_id in ray.get(mesh.shards[shard].contexts.remote(), timeout=5):
                break
        except Exception:  # noqa: BLE001 - not placed yet
            pass
        time.sleep(every_s)
    return time.monotonic() - t0
