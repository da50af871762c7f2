"""Helpers for fault tests that run as driver scripts (simulated or namespace hosts)."""

import time

import ray


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
