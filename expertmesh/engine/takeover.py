"""Serving a lost shard's segments from the store on the shards that are alive.

With a store, a segment is a file any shard can open, not memory tied to one host. While Ray
does not report a context shard alive (its host lost and no room to restart it elsewhere, or
its process restarting), the router plans that shard's items onto a live shard instead
(`serving_map`); the live shard opens the segment file under an alias id (`alias`), reading
pages from the store into its own pool, and answers the same partial (out, LSE) the lost shard
would have, so logits stay exact. When Ray reports the shard alive again it rejoins the data
plane, the router plans its segments onto it once more, and the aliases are dropped from the
shards that stood in (`Engine` keeps them in `adopted`).

Without a store, a lost shard's contexts are gone with its memory: requests over them fail at
once, naming the shard, and the rest of the mesh keeps serving.
"""

from __future__ import annotations

SEP = "@"  # never in a context id the mesh makes (ctx-<hex>)


def alias(context_id: str, shard: int) -> str:
    """The id a stand-in shard serves `shard`'s segment of a context under."""
    return f"{context_id}{SEP}{shard}"


def alias_of(name: str) -> tuple[str, int] | None:
    """(context id, owner shard) of an alias; None for a plain context id."""
    cid, sep, shard = name.rpartition(SEP)
    return (cid, int(shard)) if sep and shard.isdigit() else None


def serving_map(num_shards: int, absent: set[int] | dict[int, str], load: list[int] | None = None
                ) -> dict[int, int]:
    """Absent shard -> the live shard serving its segments (the least loaded first, by `load`
    tokens, each stand-in taking on what it serves); {} when no shard is alive."""
    live = [s for s in range(num_shards) if s not in absent]
    if not live:
        return {}
    load = list(load) if load is not None else [0] * num_shards
    out = {}
    for shard in sorted(absent, key=lambda s: -load[s]):  # the biggest first
        host = min(live, key=lambda s: (load[s], s))
        out[shard] = host
        load[host] += load[shard]
    return out
