"""Next-token choice from logits: greedy, temperature and nucleus (top-p) sampling."""

from __future__ import annotations

import dataclasses
import math
import numbers

import torch

SEED_RANGE = (-(1 << 63), 1 << 64)  # what torch.Generator.manual_seed takes


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Every sampling option of one request, checked once where it is built and handed whole
    from the HTTP edge (or `Mesh.generate`) to the router's sampler, as vLLM's SamplingParams.

    max_new_tokens: tokens to generate at most (0: the prompt's step only).
    temperature: 0 is greedy; top_p: the nucleus mass kept, in (0, 1].
    seed: the request's own generator: the same request draws the same tokens on any router.
    stop_token_ids: ids that end the completion (besides the checkpoint's eos ids); kept in it.
    stop: strings that end the completion; matched on the text at the edge that detokenizes,
    which then cancels the request (the sampler sees ids only).
    ignore_eos: the checkpoint's eos ids do not end the completion (stop_token_ids still do):
    it runs to max_new_tokens (vLLM's `ignore_eos`, for benchmarks and fault drills).
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not is_real(self.temperature) or not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be >= 0 and finite (0: greedy), got {self.temperature!r}")
        if not is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not (is_int(self.seed) and SEED_RANGE[0] <= self.seed < SEED_RANGE[1]):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64) or None, got {self.seed!r}")
        if isinstance(self.stop_token_ids, (str, bytes)) or not isinstance(self.stop_token_ids, (tuple, list)):
            raise ValueError(f"stop_token_ids must be a sequence of token ids, got {self.stop_token_ids!r}")
        bad = next((t for t in self.stop_token_ids if not is_int(t) or t < 0), None)
        if bad is not None:
            raise ValueError(f"stop_token_ids must be integers >= 0, got {bad!r} in {list(self.stop_token_ids)}")
        if isinstance(self.stop, (str, bytes)) or not isinstance(self.stop, (tuple, list)):
            raise ValueError(f"stop must be a sequence of strings, got {self.stop!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(self.stop)}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        # plain Python values (a numpy integer or a list from a caller): the object hashes and pickles as data
        set_ = object.__setattr__
        set_(self, "max_new_tokens", int(self.max_new_tokens))
        set_(self, "temperature", float(self.temperature))
        set_(self, "top_p", float(self.top_p))
        set_(self, "seed", None if self.seed is None else int(self.seed))
        set_(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        set_(self, "stop", tuple(self.stop))
        set_(self, "ignore_eos", bool(self.ignore_eos))


def is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """logits [V] -> token id."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < params.top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))
