"""Data-only encodings of the data plane's structured messages: an actor's step plan and an
actor's error. Nothing read from a socket is unpickled.

Both are MessagePack (the decoder builds only lists, maps, strings, numbers and bytes; no
extension types are accepted), with a version tag first, and every field checked for type
and range before the message is used; arrays (query positions) travel as raw little-endian
int64 bytes beside the structure, each distinct array once per plan. The plan's own sizes
are checked against what the receiving actor knows of the mesh (`WireLimits`, handed to it
through Ray when it joins a group): heads, head dim and hidden width must be its own, layers
must exist, rows and expert pairs stay within the step's declared rows.

    plan   ["emplan", 1, generation, heads, head_dim, hidden, rows, arrays, parts]
           parts: ["a", layer, [[context_id, t, array index, [[request_id, n], ...],
                                 top_pages | None, [file, start, end] | None], ...]]
                | ["e", layer, packed, pairs]
    error  ["emerr", 1, kind, message]   kind: one of ERROR_KINDS (the router raises that class;
           all are the project's: expertmesh.errors and the store's StoreCorrupted)

The messages of a step (rank 0 is the router; collective.py):

  attend  router -> shard   fp32 [n_items + rows*Hq*D]: an active flag per planned item, then
                            the items' query rows (rows of inactive items are zeros)
          shard -> router   fp32 [1 + active rows*Hq*(D+1) + 3*active items]: status; per active
                            item its partial output [t*Hq*D] then its LSE [t*Hq]; pages read
                            per active item (all, from memory, from the store)
  experts router -> group   int64 [1]: rows n;  then, when n > 0, fp32 [n, H] rows and int64 [n]
                            expert ids (small steps over gloo/NCCL, where a message costs more:
                            one fp32 message, the count then rows + expert id [n, H+1] padded
                            to the most the group can get)
          group -> router   fp32 [1 + n*H]: status, expert outputs

A message that fails any check raises `WireError`; the receiving side ends that connection.
"""

from __future__ import annotations

import dataclasses

import msgpack
import numpy as np

from expertmesh.engine.step_plan import PACK_LIMIT, Part, PeerPlan
from expertmesh.errors import (
    CapacityError,
    ContextNotFound,
    InvalidRequest,
    MeshActorError,
    Unavailable,
)
from expertmesh.store.pages import StoreCorrupted

WIRE_VERSION = 1
MAX_PLAN_BYTES = 64 << 20  # one actor's plan of one step
MAX_STEP_ROWS = 1 << 21  # token rows of one step (a prefill longer than this is refused by the router)
MAX_ERROR_BYTES = 16 << 10  # an encoded error
MAX_ERROR_CHARS = 4000  # of its message
MAX_STR_BYTES = 4096  # a context id, request id or segment file name


class WireError(ValueError):
    """A data-plane message that is malformed, of another version, or outside the plan's bounds."""


@dataclasses.dataclass(frozen=True)
class WireLimits:
    """What an actor checks a plan against (its own model's shape; handed over by Ray)."""

    heads: int
    head_dim: int
    hidden: int
    num_layers: int
    shards: int = 1  # context shards: one shard may stand in for others (takeover.py), serving a row once per segment


# -- step plans ------------------------------------------------------------------------------
def encode_plan(plan: PeerPlan, rows: int) -> bytes:
    """rows: the step's token rows (the bound every part's rows and pairs stay within)."""
    if rows > MAX_STEP_ROWS:
        raise ValueError(f"a step of {rows:,} token rows exceeds the data plane's {MAX_STEP_ROWS:,}; "
                         f"send a shorter prompt or register the text as a context")
    arrays: dict[bytes, int] = {}
    parts = []
    for p in plan.parts:
        if p.kind == "attend":
            items = []
            for context_id, t, q_pos, visits, top_pages, segment in p.items:
                raw = np.ascontiguousarray(q_pos, dtype="<i8").tobytes()
                index = arrays.setdefault(raw, len(arrays))
                items.append([context_id, int(t), index, [[r, int(n)] for r, n in visits.items()],
                              None if top_pages is None else int(top_pages),
                              None if segment is None else [segment[0], int(segment[1]), int(segment[2])]])
            parts.append(["a", p.layer, items])
        else:
            parts.append(["e", p.layer, p.packed, p.pairs])
    data = msgpack.packb(["emplan", WIRE_VERSION, plan.generation, plan.heads, plan.head_dim, plan.hidden, rows,
                          list(arrays), parts], use_bin_type=True)
    if len(data) > MAX_PLAN_BYTES:
        raise ValueError(f"a step plan of {len(data):,} bytes exceeds the data plane's {MAX_PLAN_BYTES:,}")
    return data


def decode_plan(data: bytes, limits: WireLimits, generation: int) -> PeerPlan:
    """The plan an actor received, checked against its own limits and group generation."""
    msg = _unpack(data, MAX_PLAN_BYTES)
    tag = _list(msg, "plan", 9)
    if tag[0] != "emplan":
        raise WireError(f"not a step plan (tag {str(tag[0])[:20]!r})")
    if tag[1] != WIRE_VERSION:
        raise WireError(f"step plan version {tag[1]!r}; this actor speaks version {WIRE_VERSION}")
    _, _, gen, heads, head_dim, hidden, rows, arrays, parts = tag
    if _int(gen, "generation") != generation:
        raise WireError(f"a step plan of group generation {gen}; this actor's group is generation {generation}")
    if (heads, head_dim, hidden) != (limits.heads, limits.head_dim, limits.hidden):
        raise WireError(f"a step plan for heads/head_dim/hidden {(heads, head_dim, hidden)}; this mesh's are "
                        f"{(limits.heads, limits.head_dim, limits.hidden)}")
    rows = _int(rows, "rows", 1, MAX_STEP_ROWS)
    positions = []
    for a in _list(arrays, "arrays"):
        if not isinstance(a, bytes) or len(a) % 8 or len(a) > 8 * rows:
            raise WireError(f"a position array of {len(a) if isinstance(a, bytes) else type(a).__name__} bytes "
                            f"(int64 rows, at most {rows})")
        positions.append(np.frombuffer(a, dtype="<i8").astype(np.int64))
    out = []
    for p in _list(parts, "parts"):
        p = _list(p, "part")
        if not p or p[0] not in ("a", "e"):
            raise WireError("a plan part that is neither attention ('a') nor experts ('e')")
        if p[0] == "a":
            out.append(_attend_part(p, limits, rows, positions))
        else:
            _, layer, packed, pairs = _list(p, "experts part", 4)
            out.append(Part("experts", _int(layer, "layer", 0, limits.num_layers - 1),
                            packed=_int(packed, "packed", 0, PACK_LIMIT // (hidden + 1)),
                            pairs=_int(pairs, "pairs", 0, rows * _TOP_K_CAP)))
    return PeerPlan(generation, tuple(out), heads, head_dim, hidden)


_TOP_K_CAP = 64  # experts per token a plan may route (pairs <= rows * this)


def _attend_part(p: list, limits: WireLimits, rows: int, positions: list[np.ndarray]) -> Part:
    _, layer, items = _list(p, "attention part", 3)
    layer = _int(layer, "layer", 0, limits.num_layers - 1)
    out, total = [], 0
    for it in _list(items, "items"):
        context_id, t, index, visits, top_pages, segment = _list(it, "item", 6)
        t = _int(t, "item rows", 1, rows)
        total += t
        if total > rows * limits.shards:
            raise WireError(f"attention items of more rows than the step's {rows} times the mesh's "
                            f"{limits.shards} context shard(s)")
        q_pos = positions[_int(index, "array index", 0, len(positions) - 1)]
        if len(q_pos) != t:
            raise WireError(f"an item of {t} rows with {len(q_pos)} positions")
        seen = {}
        for v in _list(visits, "visits"):
            r, n = _list(v, "visit", 2)
            seen[_str(r, "request id")] = _int(n, "visit rows", 0, t)
        if top_pages is not None:
            top_pages = _int(top_pages, "top_pages", 1, 1 << 40)
        if segment is not None:
            f, a, b = _list(segment, "segment", 3)
            segment = (_str(f, "segment file"), _int(a, "segment start", 0, 1 << 62), _int(b, "segment end", 0, 1 << 62))
        out.append((_str(context_id, "context id"), t, q_pos, seen, top_pages, segment))
    return Part("attend", layer, tuple(out))


# -- errors ----------------------------------------------------------------------------------
ERROR_KINDS: dict[str, type[Exception]] = {
    "ContextNotFound": ContextNotFound,
    "CapacityError": CapacityError,
    "StoreCorrupted": StoreCorrupted,
    "Unavailable": Unavailable,
    "InvalidRequest": InvalidRequest,  # any ValueError of an actor
    "MeshActorError": MeshActorError,
}
_SENT_AS = {"InvalidRequest": ValueError}  # a kind that stands for a wider class on the actor's side


def encode_error(exc: BaseException) -> bytes:
    """(kind, message): the first class of ERROR_KINDS the error is an instance of (any other
    ValueError: InvalidRequest), else MeshActorError with the error's type in the message."""
    kind = next((k for k, cls in ERROR_KINDS.items()
                 if k != "MeshActorError" and isinstance(exc, _SENT_AS.get(k, cls))), None)
    text = str(exc) if kind is not None else f"{type(exc).__name__}: {exc}"
    kind = kind or "MeshActorError"
    text = text[:MAX_ERROR_CHARS]
    data = msgpack.packb(["emerr", WIRE_VERSION, kind, text], use_bin_type=True)
    while len(data) > MAX_ERROR_BYTES:  # multi-byte characters
        text = text[:len(text) // 2]
        data = msgpack.packb(["emerr", WIRE_VERSION, kind, text], use_bin_type=True)
    return data


def decode_error(data: bytes, rank: int) -> Exception:
    """The router's exception for an actor's encoded error: one of ERROR_KINDS."""
    tag = _list(_unpack(data, MAX_ERROR_BYTES), "error", 4)
    if tag[0] != "emerr" or tag[1] != WIRE_VERSION:
        raise WireError(f"not a version-{WIRE_VERSION} error message")
    kind, text = _str(tag[2], "error kind"), _str(tag[3], "error message", MAX_ERROR_BYTES)
    cls = ERROR_KINDS.get(kind)
    if cls is None:
        raise WireError(f"an error of unknown kind {kind[:40]!r}; kinds: {sorted(ERROR_KINDS)}")
    if cls is MeshActorError:
        return MeshActorError(f"mesh actor at rank {rank} failed: {text}")
    return cls(text)


# -- checks ----------------------------------------------------------------------------------
def _unpack(data: bytes, limit: int):
    if len(data) > limit:
        raise WireError(f"a message of {len(data):,} bytes; at most {limit:,}")
    try:
        return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True,
                               max_str_len=max(MAX_STR_BYTES, MAX_ERROR_BYTES), max_bin_len=limit,
                               max_array_len=limit, max_map_len=0, max_ext_len=0)
    except (ValueError, msgpack.UnpackException) as exc:  # truncated, extra bytes, bad UTF-8, over a limit
        raise WireError(f"a malformed message ({type(exc).__name__}: {str(exc)[:120]})") from None


def _list(v, what: str, n: int | None = None) -> list:
    if not isinstance(v, list) or (n is not None and len(v) != n):
        raise WireError(f"{what}: expected a list{'' if n is None else f' of {n}'}, got "
                        f"{type(v).__name__}{f' of {len(v)}' if isinstance(v, list) else ''}")
    return v


def _int(v, what: str, lo: int | None = None, hi: int | None = None) -> int:
    if type(v) is not int or (lo is not None and v < lo) or (hi is not None and v > hi):
        raise WireError(f"{what}: expected an integer in [{lo}, {hi}], got {str(v)[:40]!r}")
    return v


def _str(v, what: str, limit: int = MAX_STR_BYTES) -> str:
    if not isinstance(v, str) or len(v.encode()) > limit:
        raise WireError(f"{what}: expected a string of at most {limit} bytes")
    return v


__all__ = ["ERROR_KINDS", "MAX_ERROR_BYTES", "MAX_PLAN_BYTES", "MAX_STEP_ROWS", "WIRE_VERSION",
           "WireError", "WireLimits", "decode_error", "decode_plan", "encode_error", "encode_plan"]
