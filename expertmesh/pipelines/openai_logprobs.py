"""Log-probabilities in OpenAI's two shapes: the legacy completions object (tokens,
token_logprobs, top_logprobs, text_offset) and chat's per-token entries with bytes.

A token's text is its id decoded alone (two ids that decode to the same text share a key in
`top_logprobs`, as in vLLM). The values are the model's own log_softmax, before temperature,
penalties and bias (engine: model/sampling.py)."""

from __future__ import annotations

from typing import Callable, Iterable

from expertmesh.model.sampling import TokenLogprob
from expertmesh.pipelines import openai_schema as oa

Decode = Callable[[list[int]], str]


def _text(decode: Decode, token_id: int) -> str:
    return decode([token_id])


def completion(decode: Decode, entries: Iterable[TokenLogprob | None], token_ids: list[int],
               offset: int = 0) -> oa.CompletionLogprobs:
    """entries[i] belongs to token_ids[i] (None: a prompt's first token, which has none);
    `offset`: where the first token's text starts in the choice's text."""
    out = oa.CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for token_id, entry in zip(token_ids, entries):
        text = _text(decode, token_id)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(entry.logprob)
        top = {}
        for t, lp in entry.top:
            top.setdefault(_text(decode, t), lp)
        out.top_logprobs.append(top)
    return out


def chat(decode: Decode, entries: Iterable[TokenLogprob]) -> oa.ChatLogprobs:
    content = []
    for entry in entries:
        text = _text(decode, entry.token_id)
        content.append(oa.TokenLogprobEntry(
            token=text, logprob=entry.logprob, bytes=list(text.encode()),
            top_logprobs=[oa.TopLogprob(token=(t_text := _text(decode, t)), logprob=lp, bytes=list(t_text.encode()))
                          for t, lp in entry.top]))
    return oa.ChatLogprobs(content=content)
