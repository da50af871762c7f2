"""What crosses from the HTTP edge (or `Mesh`) to a router and back: one request, the chunks of
a stream and one result, each a frozen value checked where it is built.

They cross Ray's control plane whole (pickled between the mesh's own processes, which trust
each other); nothing here travels on the data plane.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from expertmesh.model.sampling import SamplingParams, TokenLogprob, is_int, is_real


@dataclasses.dataclass(frozen=True)
class Request:
    """One request to a router (`generate`, `stream`, `forward_logits`).

    prompt_ids: the request's own tokens, after the context's (not empty; the router checks
    them against its vocabulary).
    context_id: the registered context to attend over; None: none.
    params: every sampling option (`forward_logits` samples nothing and ignores them).
    tenant: whose request; the router admits waiting requests tenant by tenant.
    request_id: the name `cancel` takes; None: the router names it.
    top_shards: k: the k shards whose page summaries bound q.k highest (global layers);
    None: every shard.
    top_pages: p: in each shard only the p best-bounded pages (Quest); None: every page (exact).
    deadline: a `time.time()` by which the answer must be complete; a router that has not
    finished the request by then fails it with DeadlineExceeded. None: no bound.
    """

    prompt_ids: tuple[int, ...]
    context_id: str | None = None
    params: SamplingParams = SamplingParams()
    tenant: str = "default"
    request_id: str | None = None
    top_shards: int | None = None
    top_pages: int | None = None
    deadline: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_ids", _token_ids(self.prompt_ids, "prompt"))
        if self.context_id is not None and (not isinstance(self.context_id, str) or not self.context_id):
            raise ValueError(f"context_id must be a non-empty string or None, got {self.context_id!r}")
        if not isinstance(self.params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(self.params).__name__}")
        if not isinstance(self.tenant, str) or not self.tenant:
            raise ValueError(f"tenant must be a non-empty string, got {self.tenant!r}")
        if self.request_id is not None and (not isinstance(self.request_id, str) or not self.request_id):
            raise ValueError(f"request_id must be a non-empty string or None, got {self.request_id!r}")
        if self.top_shards is not None and (not is_int(self.top_shards) or self.top_shards < 1):
            raise ValueError(f"top_shards must be >= 1 or None (all shards), got {self.top_shards!r}")
        if self.top_pages is not None and (not is_int(self.top_pages) or self.top_pages < 1):
            raise ValueError(f"top_pages must be an integer >= 1 or None (every page), got {self.top_pages!r}")
        if self.deadline is not None and not (is_real(self.deadline) and 0 < self.deadline < math.inf):
            raise ValueError(f"deadline must be a time.time() in seconds (> 0, finite) or None, got {self.deadline!r}")
        for name in ("top_shards", "top_pages"):  # plain ints (a numpy integer from a caller)
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int(getattr(self, name)))
        if self.deadline is not None:
            object.__setattr__(self, "deadline", float(self.deadline))

    def seconds_left(self) -> float | None:
        """Seconds until the deadline (negative once past it); None: no deadline."""
        return None if self.deadline is None else self.deadline - time.time()


@dataclasses.dataclass(frozen=True)
class Chunk:
    """What a stream yields while it generates: the tokens since the last chunk (several when
    its reader lags behind the steps), and their log-probabilities when the request asked."""

    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Result:
    """A finished request (`Sequence.result` builds it): what a `generate` returns and a
    stream's last item.

    finish_reason: "stop" (an eos or stop token, or cancelled), "length" (max_new_tokens).
    context_tokens: the context's length (0 without one).
    pathway: the shards per layer, the tokens each expert group took, the shards visited and the
    pages read per shard and tier (empty before the first token).
    ttft_s: seconds from arrival at the router to the first token (None: none came); total_s:
    to the end.
    logprobs: per generated token (params.logprobs set); prompt_logprobs: per prompt token, the
    first None (params.prompt_logprobs set); None when not asked.
    """

    request_id: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    context_tokens: int
    pathway: dict
    ttft_s: float | None
    total_s: float
    logprobs: tuple[TokenLogprob, ...] | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


def _token_ids(ids, what: str) -> tuple[int, ...]:
    """Token ids as a tuple of ints; refuses what cannot be one (empty, not integers, negative)."""
    if isinstance(ids, (str, bytes)):
        raise ValueError(f"{what} token ids must be integers, got a {type(ids).__name__}")
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"{what} token ids must be a flat sequence, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError(f"the {what} is empty; at least 1 token is needed")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{what} token ids must be integers, got dtype {arr.dtype}")
    if (arr < 0).any():
        i = int(np.argmax(arr < 0))
        raise ValueError(f"{what} token id {int(arr[i])} at index {i} is negative")
    return tuple(arr.tolist())
