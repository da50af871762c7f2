"""A request as the router runs it: its `Sequence`, checked against this model (deadline,
positions) with its context's segments and files and its grammar's matcher."""

from __future__ import annotations

from typing import Callable

from expertmesh.engine.request import Request
from expertmesh.engine.sequence import Sequence
from expertmesh.errors import DeadlineExceeded
from expertmesh.model.config import ModelConfig
from expertmesh.model.grammar import Grammars
from expertmesh.model.kv_pool import KVPool
from expertmesh.model.sampling import SamplingParams
from expertmesh.store.registry import ContextRecord


def new_sequence(kind: str, request: Request, request_id: str, cfg: ModelConfig,
                 record_of: Callable[[str], ContextRecord], grammars: Callable[[], Grammars], pool: KVPool) -> Sequence:
    """record_of: a ready context's record (ContextNotFound otherwise); grammars: the router's
    structured-output builder; pool: the engine's KV pool for the request's own tokens."""
    left = request.seconds_left()
    if left is not None and left <= 0:
        raise DeadlineExceeded(f"request {request_id!r} reached the router {-left:.3f} s after its deadline; "
                               "nothing was run")
    params = request.params if kind == "generate" else SamplingParams(max_new_tokens=0)
    segments, start, files = [], 0, {}
    if request.context_id is not None:
        record = record_of(request.context_id)
        segments, start = record.segments, record.info.num_tokens
        files = {s.shard: (f, s.start, s.end) for s, f in zip(record.segments, record.files)}
    total = start + len(request.prompt_ids) + params.max_new_tokens
    if total > cfg.max_position_embeddings:
        raise ValueError(f"context ({start}) + prompt ({len(request.prompt_ids)}) + max_new_tokens "
                         f"({params.max_new_tokens}) = {total} exceeds max_position_embeddings "
                         f"({cfg.max_position_embeddings})")
    seq = Sequence(request_id, kind, list(request.prompt_ids), start, segments, request.context_id, params,
                   cfg.num_layers, request.top_shards, request.tenant, top_pages=request.top_pages,
                   segment_files=files, deadline=request.deadline, pool=pool)
    if params.grammar is not None:
        seq.matcher = grammars().matcher(params.grammar)
    return seq
