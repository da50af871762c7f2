"""A generating request's next token after a step: the first step's bookkeeping (time to first
token, the pathway frozen, prompt log-probabilities), then sampling under the request's
parameters and grammar, the token emitted to its stream, and whether it is finished."""

from __future__ import annotations

import time

import torch

from expertmesh.engine.sequence import Sequence
from expertmesh.model.config import ModelConfig
from expertmesh.model.sampling import logprobs_of, sample


def next_token(seq: Sequence, logits: torch.Tensor, cfg: ModelConfig) -> str | None:
    """Sample and emit `seq`'s next token from its step's logits (the last row's, or every row of
    a prefill that wants the prompt's log-probabilities); its finish reason, or None to run on."""
    if seq.t_first is None:
        seq.t_first = time.perf_counter()
        seq.freeze_pathway()
    params = seq.params
    if logits.dim() == 2:  # the prefill's every row: the prompt's log-probabilities, then the last row's choice
        rows = logits
        prompt = seq.token_ids[:seq.prompt_len]
        seq.prompt_logprobs = [None] + logprobs_of(rows[-len(prompt):-1], prompt[1:], params.prompt_logprobs)
        logits = rows[-1]
    if params.max_new_tokens == 0:
        return "length"
    stop_ids = () if params.ignore_eos else tuple(cfg.eos_token_id)
    allowed = seq.matcher.mask(logits) if seq.matcher is not None else logits  # the grammar's next tokens
    token = sample(allowed, params, seq.generator, seq.token_ids[:seq.prompt_len], seq.output,
                   stop_ids + params.stop_token_ids)
    if seq.matcher is not None:
        seq.matcher.consume(token)
    if params.logprobs is not None:
        seq.logprobs.extend(logprobs_of(logits.view(1, -1), [token], params.logprobs))
    seq.output.append(token)
    seq.token_ids.append(token)
    if seq.stream is not None:
        seq.stream.put_nowait(token)
    eos = token in cfg.eos_token_id and not params.ignore_eos
    if eos or token in seq.params.stop_token_ids or seq.cancelled or (seq.matcher is not None and seq.matcher.done):
        return "stop"
    if len(seq.output) >= seq.params.max_new_tokens:
        return "length"
    return None
