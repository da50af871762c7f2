"""Server-sent events of the chat and completions APIs (OpenAI's chunk objects)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, Callable

from expertmesh.pipelines.api_errors import ApiError


def chunk(rid: str, model: str, created: int, index: int, delta: str, chat: bool, finish: str | None,
          first: bool) -> dict:
    """One choice's chunk: a chat delta (the role on a choice's first) or a completion's text."""
    if chat:
        d = {"role": "assistant", "content": delta} if first else ({"content": delta} if delta else {})
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": index, "delta": d, "logprobs": None, "finish_reason": finish}]}
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": delta, "logprobs": None, "finish_reason": finish}]}


def event(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def whole_answer(rid: str, model: str, choices: list, pathways: list[dict], usages: list, usage,
                       include_usage: bool) -> AsyncIterator[str]:
    """A chat answer already complete (its tool calls were read from the whole text) as a
    stream: per choice one delta (role, content or tool_calls, logprobs) and its end; then the
    usage chunk when asked; then [DONE]."""
    created = int(time.time())
    for choice, pathway, own in zip(choices, pathways, usages):
        msg = choice.message
        delta: dict = {"role": "assistant", "content": msg.content}
        if msg.tool_calls:
            delta["tool_calls"] = [{"index": k, **c.model_dump()} for k, c in enumerate(msg.tool_calls)]
        head = chunk(rid, model, created, choice.index, "", True, None, first=True)
        head["choices"][0]["delta"] = delta
        head["choices"][0]["logprobs"] = None if choice.logprobs is None else choice.logprobs.model_dump()
        yield event(head)
        end = chunk(rid, model, created, choice.index, "", True, choice.finish_reason, first=False)
        if not include_usage:  # each choice's usage rides on its last chunk
            end["usage"] = own.model_dump()
        end["pathway"] = pathway
        yield event(end)
    if include_usage:
        yield event({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
                     "usage": usage.model_dump()})
    yield "data: [DONE]\n\n"


async def token_events(rid: str, model: str, streams: list[AsyncIterator], reqs: list, chat: bool,
                       include_usage: bool, echo: list[tuple[str, list[int]]] | None, n: int,
                       choice_logprobs: Callable[..., Any], usage_of: Callable[..., Any]) -> AsyncIterator[str]:
    """Every choice's tokens as they come, choices interleaved (each chunk names its index):
    `streams[i]` yields (text delta, log-probabilities or None, None) and finally ("", None,
    result). A choice that fails ends the stream with an error event after the others."""
    created = int(time.time())
    queue: asyncio.Queue = asyncio.Queue()

    async def run(i: int) -> None:
        try:
            async for delta, lps, result in streams[i]:
                await queue.put((i, delta, lps, result, None))
        except BaseException as exc:  # noqa: BLE001 - reported in the stream, the others go on
            await queue.put((i, "", None, None, exc))

    tasks = [asyncio.ensure_future(run(i)) for i in range(len(reqs))]
    results: dict[int, Any] = {}
    first = set(range(len(reqs)))
    offsets = [len(text) for text, _ in echo] if echo is not None else [0] * len(reqs)
    try:
        open_, failed = len(reqs), None
        while open_:
            i, delta, lps, result, exc = await queue.get()
            if exc is not None:
                failed = failed or exc
                open_ -= 1
                continue
            if result is not None:
                results[i] = result
                open_ -= 1
                end = chunk(rid, model, created, i, "", chat, result.finish_reason, first=i in first)
                if echo is not None and i in first:
                    end["choices"][0]["text"] = echo[i][0]
                    if reqs[i].params.prompt_logprobs is not None:
                        end["choices"][0]["logprobs"] = choice_logprobs(chat, reqs[i], result, [], echo[i][1],
                                                                        0).model_dump()
                first.discard(i)
                if not include_usage:  # usage and pathway ride on each choice's last chunk
                    end["usage"] = usage_of([result]).model_dump()
                end["pathway"] = result.pathway
                yield event(end)
                continue
            out = chunk(rid, model, created, i, delta, chat, None, first=i in first)
            if not chat and echo is not None and i in first:
                out["choices"][0]["text"] = echo[i][0] + delta
            if lps is not None:
                echo_ids = echo[i][1] if echo is not None and i in first else None
                if echo_ids is not None and reqs[i].params.prompt_logprobs is not None:
                    got = choice_logprobs(chat, reqs[i], None, lps, echo_ids, 0)
                else:
                    got = choice_logprobs(chat, reqs[i], None, lps, None, offsets[i])
                out["choices"][0]["logprobs"] = None if got is None else got.model_dump()
            offsets[i] += len(delta)
            first.discard(i)
            yield event(out)
        if failed is not None:
            exc = failed if isinstance(failed, ApiError) else ApiError(500, f"{type(failed).__name__}: {failed}",
                                                                     "server_error")
            yield event({"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}})
        elif include_usage:
            yield event({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                         "created": created, "model": model, "choices": [],
                         "usage": usage_of(list(results.values()), n).model_dump()})
    finally:
        for t in tasks:
            t.cancel()
    yield "data: [DONE]\n\n"
