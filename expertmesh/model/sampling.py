"""Next-token choice from logits (greedy, temperature, top-k, top-p, min-p; penalties, logit
bias, min_tokens) and the log-probabilities a request asks for, as vLLM's sampler orders them:
logit bias and min_tokens, then penalties, then temperature, min-p, top-k, top-p.

Log-probabilities are the model's own: `log_softmax` of the raw logits, before bias, penalties
and temperature (vLLM's default `raw_logprobs`)."""

from __future__ import annotations

import dataclasses
import math
import numbers

import torch

from expertmesh.model.grammar import GrammarSpec

SEED_RANGE = (-(1 << 63), 1 << 64)  # what torch.Generator.manual_seed takes
MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit


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
    top_k: keep the k most likely tokens (0: all); min_p: drop tokens below min_p times the top
    token's probability (0: none).
    presence_penalty, frequency_penalty: subtracted from a token's logit once if it occurs in the
    output so far / once per occurrence (OpenAI's, in [-2, 2]); repetition_penalty: a token of the
    request's prompt or output has its logit divided by it when positive, multiplied when
    negative (1: none; the registered context's tokens are not counted).
    logit_bias: (token id, bias) pairs added to the logits, bias in [-100, 100].
    min_tokens: the eos and stop token ids cannot end the completion before this many tokens.
    logprobs: None, or k in [0, 20]: each generated token's log-probability and the k most
    likely tokens' (0: the chosen token's only); prompt_logprobs: the same for the prompt's
    tokens (the first has none: nothing precedes it in the request).
    grammar: structured output (model/grammar.py): each token drawn among those the grammar
    allows next; the completion ends when the grammar is complete.
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    grammar: GrammarSpec | None = None

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
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0: every token), got {self.top_k!r}")
        if not is_real(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not is_real(getattr(self, name)) or not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not is_real(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= 100.0:
            raise ValueError(f"repetition_penalty must be in (0, 100] (1: none), got {self.repetition_penalty!r}")
        bias = dict(self.logit_bias) if isinstance(self.logit_bias, dict) else None
        pairs = list(bias.items()) if bias is not None else list(self.logit_bias)
        for pair in pairs:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and is_int(pair[0]) and pair[0] >= 0
                    and is_real(pair[1]) and -100.0 <= pair[1] <= 100.0):
                raise ValueError(f"logit_bias must map token ids >= 0 to biases in [-100, 100], got {pair!r}")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {v!r}")
        if self.grammar is not None and not isinstance(self.grammar, GrammarSpec):
            raise ValueError(f"grammar must be a GrammarSpec or None, got {type(self.grammar).__name__}")
        # plain Python values (a numpy integer or a list from a caller): the object hashes and pickles as data
        set_ = object.__setattr__
        set_(self, "max_new_tokens", int(self.max_new_tokens))
        set_(self, "temperature", float(self.temperature))
        set_(self, "top_p", float(self.top_p))
        set_(self, "seed", None if self.seed is None else int(self.seed))
        set_(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        set_(self, "stop", tuple(self.stop))
        set_(self, "ignore_eos", bool(self.ignore_eos))
        for name in ("top_k", "min_tokens"):
            set_(self, name, int(getattr(self, name)))
        for name in ("min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            set_(self, name, float(getattr(self, name)))
        set_(self, "logit_bias", tuple(sorted((int(t), float(b)) for t, b in pairs)))
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                set_(self, name, int(getattr(self, name)))

    @property
    def processed(self) -> bool:
        """Whether anything changes the logits before temperature (bias, penalties, min_tokens)."""
        return bool(self.logit_bias or self.min_tokens or self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0)


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One position's log-probabilities: the token there and the `k` most likely tokens
    (id, logprob), most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def logprobs_of(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """logits [N, V] (raw), the token chosen at each row [N] -> each row's TokenLogprob with
    its k most likely tokens."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, torch.as_tensor(tokens, dtype=torch.long).view(-1, 1)).view(-1).tolist()
    if k:
        vals, ids = lp.topk(k, dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
    else:
        tops = [()] * len(tokens)
    return [TokenLogprob(t, c, top) for t, c, top in zip(tokens, chosen, tops)]


def process(logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int],
            stop_ids: tuple[int, ...]) -> torch.Tensor:
    """The logits [V] after logit bias, min_tokens and the penalties (a new tensor)."""
    x = logits.float().clone()
    vocab = x.shape[-1]
    if params.min_tokens and len(output) < params.min_tokens:
        ids = [t for t in stop_ids if t < vocab]
        if ids:
            x[ids] = -math.inf
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias if t < vocab], dtype=torch.long)
        x.index_add_(0, ids, torch.tensor([b for t, b in params.logit_bias if t < vocab], dtype=x.dtype))
    if params.repetition_penalty != 1.0 and (prompt or output):
        seen = torch.unique(torch.tensor(list(prompt) + list(output), dtype=torch.long))
        v = x[seen]
        x[seen] = torch.where(v > 0, v / params.repetition_penalty, v * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and output:
        counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=vocab)[:vocab].to(x.dtype)
        x -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(x.dtype)
    return x


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None,
           prompt: list[int] = (), output: list[int] = (), stop_ids: tuple[int, ...] = ()) -> int:
    """logits [V] -> token id. `prompt`/`output`: the request's tokens so far (penalties);
    `stop_ids`: what min_tokens holds back (the eos and stop token ids)."""
    if params.processed:
        logits = process(logits, params, prompt, output, stop_ids)
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.min_p > 0.0:
        probs = torch.where(probs < params.min_p * probs.max(), torch.zeros_like(probs), probs)
    if 0 < params.top_k < probs.shape[-1]:
        kth = torch.topk(probs, params.top_k).values[-1]
        probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
    if params.min_p > 0.0 or 0 < params.top_k < probs.shape[-1]:
        probs = probs / probs.sum()
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < params.top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))
