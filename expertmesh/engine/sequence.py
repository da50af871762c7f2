"""Per-request state: one explicit object per sequence the router runs, never a global."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections import Counter
from typing import Any, Literal

import numpy as np
import torch

from expertmesh.engine.pathway import Pathway, Segment
from expertmesh.engine.request import Result
from expertmesh.model.kv_cache import KVCache
from expertmesh.model.kv_pool import KVPool, SeqKV
from expertmesh.model.sampling import SamplingParams, TokenLogprob

Kind = Literal["generate", "logits", "segment"]
_UIDS = itertools.count()  # sequences of this process, in order (a caller's request ids may repeat)


@dataclasses.dataclass
class Sequence:
    """A request (or a context segment being registered) as the router steps it.

    `token_ids` holds the sequence's own tokens (prompt, then generated); their positions
    start at `start_pos` (the context length, or the segment's offset in its context).
    Context KV lives in the shards of `segments`; the sequence's own KV lives in `kv`.
    The router builds one from a `Request` (engine/request.py) and keeps its state here while it
    runs; what the caller gets back is `result()`, a value, not this object.
    """

    request_id: str
    kind: Kind
    token_ids: list[int]
    start_pos: int
    segments: list[Segment]
    context_id: str | None
    params: SamplingParams
    num_layers: int
    top_shards: int | None = None
    tenant: str = "default"
    num_computed: int = 0
    prompt_len: int = 0
    kv: KVCache | SeqKV = dataclasses.field(init=False)
    layer_shards: list[tuple[int, ...] | None] = dataclasses.field(init=False)
    pathway: Pathway | None = None
    output: list[int] = dataclasses.field(default_factory=list)
    group_tokens: Counter = dataclasses.field(default_factory=Counter)
    pathway_visits: set[int] = dataclasses.field(default_factory=set)  # shards actually visited
    logits: list[np.ndarray] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)  # per generated token, when asked
    prompt_logprobs: list[TokenLogprob | None] = dataclasses.field(default_factory=list)  # per prompt token
    matcher: Any = None  # model/grammar.py Matcher: its place in params.grammar (structured output)
    done: asyncio.Future | None = None
    stream: asyncio.Queue | None = None
    generator: torch.Generator | None = None
    t_submit: float = dataclasses.field(default_factory=time.perf_counter)
    t_first: float | None = None
    finish_reason: str | None = None
    cancelled: bool = False
    top_pages: int | None = None  # None: every page of the context (exact)
    segment_files: dict[int, tuple[str, int, int]] = dataclasses.field(default_factory=dict)  # shard -> file
    page_reads: dict[int, Counter] = dataclasses.field(default_factory=dict)  # shard -> pages read per tier
    retries: int = 0  # steps run again after an actor failed under them (at most 1)
    deadline: float | None = None  # time.time() by which the request must finish (Request.deadline)
    kv_remote: bool = False  # its own KV lives in the worker that computes its steps whole (whole_step.py)
    uid: int = dataclasses.field(default_factory=lambda: next(_UIDS), init=False)  # unique in this process
    finished: bool = False  # the router is done with it (answered, failed or cancelled)
    pool: dataclasses.InitVar[KVPool | None] = None  # the router's paged pool for `kv`; None: a KVCache of its own

    def __post_init__(self, pool: KVPool | None) -> None:
        self.prompt_len = len(self.token_ids)
        self.kv = pool.handle() if pool is not None else KVCache(self.num_layers)
        self.layer_shards = [None] * self.num_layers
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.prompt_len

    @property
    def wants_prompt_rows(self) -> bool:
        """Its prefill step needs the logits of every prompt row (prompt log-probabilities)."""
        return self.kind == "generate" and self.params.prompt_logprobs is not None and not self.prompt_logprobs

    def new_tokens(self) -> tuple[list[int], torch.Tensor]:
        """Tokens whose KV is not computed yet, and their positions [t]."""
        ids = self.token_ids[self.num_computed:]
        pos = torch.arange(self.start_pos + self.num_computed, self.start_pos + len(self.token_ids))
        return ids, pos

    def result(self) -> Result:
        """The request's answer as a value, now (its tokens so far, its pathway, its times)."""
        pathway = self.pathway.summary(dict(self.group_tokens)) if self.pathway else {}
        if pathway:
            pathway["shards"] = sorted(self.pathway_visits)
            pathway["pages"] = {shard: dict(r) for shard, r in sorted(self.page_reads.items())}
        return Result(
            request_id=self.request_id, token_ids=tuple(self.output), finish_reason=self.finish_reason,
            prompt_tokens=self.prompt_len, completion_tokens=len(self.output),
            context_tokens=self.start_pos if self.context_id else 0, pathway=pathway,
            ttft_s=(self.t_first - self.t_submit) if self.t_first else None,
            total_s=time.perf_counter() - self.t_submit,
            logprobs=tuple(self.logprobs) if self.params.logprobs is not None else None,
            prompt_logprobs=tuple(self.prompt_logprobs) if self.params.prompt_logprobs is not None else None)

    def freeze_pathway(self) -> None:
        if self.pathway is None:
            self.pathway = Pathway(self.context_id, tuple(s or () for s in self.layer_shards))
