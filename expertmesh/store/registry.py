"""The context registry: how a context is cut into segments over the context shards."""

from __future__ import annotations

import dataclasses
import math

import torch

from expertmesh.errors import CapacityError

MODES = ("exact", "blockwise")


@dataclasses.dataclass(frozen=True)
class Segment:
    """Tokens [start, end) of a context, held by context shard `shard`."""

    shard: int
    start: int
    end: int


@dataclasses.dataclass(frozen=True)
class ContextInfo:
    """What users get back for a registered context."""

    id: str
    num_tokens: int
    shards: tuple[int, ...]
    mode: str = "exact"
    owner: str = "default"
    visibility: str = "private"  # "private": owner only; "shared": every tenant may attend over it
    name: str | None = None
    created: float = 0.0
    kv_dtype: str = "float32"
    stored: bool = False  # its KV is in the mesh's durable store (survives restarts)
    chat: str | None = None  # registered as a conversation: its messages (JSON), which the tokens render


@dataclasses.dataclass
class ContextRecord:
    """The router's bookkeeping of one context."""

    info: ContextInfo
    segments: list[Segment]
    summaries: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = dataclasses.field(default_factory=dict)
    ready: bool = False
    dropped: bool = False
    active: int = 0  # sequences currently attending over it
    files: list[str] = dataclasses.field(default_factory=list)  # segment file per segment
    nbytes: list[int] = dataclasses.field(default_factory=list)
    opened: bool = False  # the shards serve its files and the router holds its summaries
    moves: int = 0  # how often its segments moved (`rebalance`): a layout with more moves is newer


def plan_segments(num_tokens: int, free_tokens: list[int], capacity_tokens: int | None, align: int,
                  shards: int | None = None) -> list[Segment]:
    """Cut [0, num_tokens) into aligned segments, one per shard, on the least-loaded shards."""
    total = len(free_tokens)
    want = total if shards is None else shards
    if not 1 <= want <= total:
        raise ValueError(f"shards must be in 1..{total} (the mesh's context shards), got {shards}")
    if num_tokens < 1:
        raise ValueError("a context needs at least 1 token")
    seg_len = math.ceil(num_tokens / want / align) * align
    count = math.ceil(num_tokens / seg_len)
    needed = 1 if capacity_tokens is None else math.ceil(num_tokens / capacity_tokens)
    if needed > want:
        raise CapacityError(
            f"context of {num_tokens:,} tokens needs {needed} shards of {capacity_tokens:,} tokens; "
            f"the mesh has {want}" + ("" if shards is None else f" (shards={shards} requested of {total})")
        )
    order = sorted(range(total), key=lambda s: (-free_tokens[s], s))[:count]
    segments = []
    for i, shard in enumerate(sorted(order)):
        start, end = i * seg_len, min(num_tokens, (i + 1) * seg_len)
        if end - start > free_tokens[shard]:
            raise CapacityError(
                f"context of {num_tokens:,} tokens: segment of {end - start:,} tokens does not fit on "
                f"context shard {shard} ({free_tokens[shard]:,} of {capacity_tokens:,} tokens free)"
            )
        segments.append(Segment(shard, start, end))
    return segments
