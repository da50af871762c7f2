"""Data-only encodings of a whole step (engine/whole_step.py): the router's request and the
worker's answer, MessagePack checked field by field as wire.py's plans (nothing unpickled,
every length bounded before it is used).

    request  ["emwhole", 1, generation, incarnation, [drop key, ...],
              [[key, kind, token ids (int64 LE bytes), start_pos, num_computed, context_id | None,
                [[shard, start, end], ...], top_pages | None, all_rows, [[shard, file, start, end], ...]], ...]]
    answer   int64 [status, meta bytes, logits rows]; status 0: the meta, then fp32 logits
             [rows, vocab]; status 1: an encoded error (wire.py) of `meta bytes`
    meta     ["emwhole-r", 1, [[visits, [[shard, pages, memory, store], ...], [[group, pairs], ...],
              [[shard, ...] | None per layer], recomputed], ...],
              [[layer, [tokens per expert]], ...], [[layer, [rows per group]], ...], [shards s, experts s]]
"""

from __future__ import annotations

import math

import msgpack
import numpy as np
import torch

from expertmesh.dataplane.wire import (
    MAX_PLAN_BYTES,
    MAX_STEP_ROWS,
    WIRE_VERSION,
    WireError,
    WireLimits,
    _int,
    _list,
    _str,
    _unpack,
)
from expertmesh.engine.whole_step import (
    KINDS,
    SeqReport,
    WholeReply,
    WholeRequest,
    WholeSeq,
)

MAX_META_BYTES = 16 << 20
_MAX_COUNT = 1 << 20  # sequences, drops, experts or groups in one message
_BIG = 1 << 62
_TAG = b"\x96\xa7emwhole"  # a request's first bytes: an array of 6 whose first item is "emwhole"


def is_whole(data: bytes) -> bool:
    return data[:len(_TAG)] == _TAG


def encode_request(req: WholeRequest, generation: int) -> bytes:
    if req.rows > MAX_STEP_ROWS:
        raise ValueError(f"a step of {req.rows:,} token rows exceeds the data plane's {MAX_STEP_ROWS:,}; "
                         f"send a shorter prompt or register the text as a context")
    seqs = [[s.key, s.kind, np.ascontiguousarray(s.token_ids, dtype="<i8").tobytes(), int(s.start_pos),
             int(s.num_computed), s.context_id, [list(map(int, g)) for g in s.segments],
             None if s.top_pages is None else int(s.top_pages), bool(s.all_rows),
             [[int(a), f, int(b), int(c)] for a, f, b, c in s.segment_files]] for s in req.seqs]
    data = msgpack.packb(["emwhole", WIRE_VERSION, generation, req.incarnation, list(req.drops), seqs],
                         use_bin_type=True)
    if len(data) > MAX_PLAN_BYTES:
        raise ValueError(f"a step of {len(data):,} bytes exceeds the data plane's {MAX_PLAN_BYTES:,}")
    return data


def decode_request(data: bytes, limits: WireLimits, generation: int) -> WholeRequest:
    tag = _list(_unpack(data, MAX_PLAN_BYTES), "whole step", 6)
    if tag[0] != "emwhole" or tag[1] != WIRE_VERSION:
        raise WireError(f"not a version-{WIRE_VERSION} whole step")
    _, _, gen, incarnation, drops, seqs = tag
    if _int(gen, "generation") != generation:
        raise WireError(f"a whole step of group generation {gen}; this actor's group is generation {generation}")
    drops = tuple(_str(k, "drop key") for k in _list(drops, "drops")[:_MAX_COUNT])
    out, rows = [], 0
    for s in _list(seqs, "sequences"):
        key, kind, ids, start, done, context_id, segments, top_pages, all_rows, files = _list(s, "sequence", 10)
        if kind not in KINDS:
            raise WireError(f"sequence kind {str(kind)[:20]!r}; kinds: {KINDS}")
        if not isinstance(ids, bytes) or not ids or len(ids) % 8 or len(ids) > 8 * MAX_STEP_ROWS:
            raise WireError("token ids: int64 bytes, 1 to MAX_STEP_ROWS of them")
        token_ids = np.frombuffer(ids, dtype="<i8").astype(np.int64)
        done = _int(done, "num_computed", 0, len(token_ids) - 1)
        rows += len(token_ids) - done
        if rows > MAX_STEP_ROWS:
            raise WireError(f"a whole step of more than {MAX_STEP_ROWS} new rows")
        segs = []
        for g in _list(segments, "segments")[:_MAX_COUNT]:
            shard, a, b = _list(g, "segment", 3)
            segs.append((_int(shard, "segment shard", 0, limits.shards - 1), _int(a, "segment start", 0, _BIG),
                         _int(b, "segment end", 0, _BIG)))
        segment_files = []
        for f in _list(files, "segment files")[:_MAX_COUNT]:
            shard, name, a, b = _list(f, "segment file", 4)
            segment_files.append((_int(shard, "file shard", 0, limits.shards - 1), _str(name, "segment file"),
                                  _int(a, "file start", 0, _BIG), _int(b, "file end", 0, _BIG)))
        if not isinstance(all_rows, bool):
            raise WireError("all_rows: expected a boolean")
        out.append(WholeSeq(_str(key, "sequence key"), kind, token_ids, _int(start, "start_pos", 0, _BIG), done,
                            None if context_id is None else _str(context_id, "context id"), tuple(segs),
                            None if top_pages is None else _int(top_pages, "top_pages", 1, _BIG), all_rows,
                            tuple(segment_files)))
    return WholeRequest(_str(incarnation, "incarnation", 64), drops, tuple(out))


def encode_meta(reply: WholeReply) -> bytes:
    seqs = [[r.visits, [[s, c.get("pages", 0), c.get("memory", 0), c.get("store", 0)] for s, c in r.reads.items()],
             [[g, n] for g, n in r.group_tokens.items()],
             [None if s is None else list(s) for s in r.layer_shards], r.recomputed] for r in reply.seqs]
    return msgpack.packb(["emwhole-r", WIRE_VERSION, seqs, [[k, v] for k, v in reply.expert_load.items()],
                          [[k, v] for k, v in reply.group_rows.items()],
                          [float(reply.waits.get("shards", 0.0)), float(reply.waits.get("expert_groups", 0.0))]],
                         use_bin_type=True)


def decode_meta(data: bytes, logits: torch.Tensor, limits: WireLimits, n_seqs: int, experts: int,
                groups: int) -> WholeReply:
    """The worker's answer to a request of n_seqs sequences, checked against the mesh's shape."""
    tag = _list(_unpack(data, MAX_META_BYTES), "whole step answer", 6)
    if tag[0] != "emwhole-r" or tag[1] != WIRE_VERSION:
        raise WireError(f"not a version-{WIRE_VERSION} whole step answer")
    _, _, seqs, load, rows, waits = tag
    shard = lambda v, what: _int(v, what, 0, limits.shards - 1)  # noqa: E731
    count = lambda v, what: _int(v, what, 0, _BIG)  # noqa: E731
    reports = []
    for r in _list(seqs, "sequence reports", n_seqs):
        visits, reads, group_tokens, layer_shards, again = _list(r, "sequence report", 5)
        layer_shards = _list(layer_shards, "layer shards", limits.num_layers)
        reports.append(SeqReport(
            [shard(v, "visited shard") for v in _list(visits, "visits")[:_MAX_COUNT]],
            {shard(s, "read shard"): {"pages": count(p, "pages"), "memory": count(m, "pages"), "store": count(t, "pages")}
             for s, p, m, t in (_list(x, "reads", 4) for x in _list(reads, "reads")[:_MAX_COUNT])},
            {_int(g, "group", 0, groups - 1): count(n, "pairs")
             for g, n in (_list(x, "group tokens", 2) for x in _list(group_tokens, "group tokens")[:_MAX_COUNT])},
            [None if s is None else tuple(shard(v, "pathway shard") for v in _list(s, "pathway")[:_MAX_COUNT])
             for s in layer_shards],
            again if isinstance(again, bool) else bool(_int(again, "recomputed", 0, 1))))
    per_layer = []
    for what, table, width in (("expert load", load, experts), ("group rows", rows, groups)):
        out = {}
        for x in _list(table, what)[:limits.num_layers]:
            layer, counts = _list(x, what, 2)
            out[_int(layer, "layer", 0, limits.num_layers - 1)] = [count(c, what) for c in _list(counts, what, width)]
        per_layer.append(out)
    waits = _list(waits, "waits", 2)
    if not all(isinstance(w, float) and math.isfinite(w) and w >= 0 for w in waits):
        raise WireError("waits: expected two finite seconds")
    return WholeReply(logits, reports, per_layer[0], per_layer[1], {"shards": waits[0], "expert_groups": waits[1]})
