"""A request's tokens from the router, as text deltas: stop strings, and failover when the
router dies under it (RouterSet).

A request whose router dies under it, or sends nothing for CHUNK_TIMEOUT_S (its host cut off),
runs again on another router (or on the same one once Ray has restarted it); tokens already sent are skipped, so it goes on where it was when its tokens
are reproducible (greedy or seeded: the Serve app seeds every sampled request that has no seed),
and is a 503 otherwise.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import ray

from expertmesh.engine.request import Request, Result
from expertmesh.pipelines.admission import Admission
from expertmesh.pipelines.api_errors import ApiError, _unavailable, api_error
from expertmesh.pipelines.detokenize import TextStream
from expertmesh.platform.router_set import CHUNK_TIMEOUT_S, RouterSet


class RouterSilent(Exception):
    """A router sent nothing for CHUNK_TIMEOUT_S: the stream goes on elsewhere, as if it had died."""


async def stream(routers: RouterSet, decode: Callable[[list[int]], str], metrics: Any, admission: Admission,
                 req: Request, recover_timeout_s: float,
                 done: Callable[[str, Result], None] | None = None) -> AsyncIterator[tuple[str, tuple | None, Result | None]]:
    """Yield (text delta, the log-probabilities of the tokens behind it or None, None) as tokens
    come and finally ("", None, result); the admission is released when it ends."""
    text = TextStream(decode, list(req.params.stop))
    result: Result | None = None
    # a request whose router dies under it runs again (RouterSet's failover); tokens already
    # sent are skipped, so it goes on where it was when its tokens are reproducible (greedy or seeded)
    replayable = req.params.temperature == 0 or req.params.seed is not None
    sent, attempt = 0, 0
    gaps: list[float] = []  # seconds between tokens as they come here (inter-token latency)
    last: float | None = None
    try:
        async for i in routers.attempts_async(recover_timeout_s):
            skip = sent
            try:
                with routers.busy(i) as router:  # counted while it streams: who is least busy
                    this = dataclasses.replace(req, request_id=f"{req.request_id}-{attempt}") if attempt else req
                    gen = router.stream.options(num_returns="streaming").remote(this)
                    while True:  # each next tokens within CHUNK_TIMEOUT_S, or the router counts as lost
                        try:
                            ref = await asyncio.wait_for(gen.__anext__(), CHUNK_TIMEOUT_S)
                        except StopAsyncIteration:
                            break
                        except asyncio.TimeoutError:
                            ray.cancel(gen)
                            raise RouterSilent(routers.name(i)) from None
                        item = await ref
                        if isinstance(item, Result):
                            result = item
                            continue
                        tokens = item.token_ids[skip:]
                        lps = item.logprobs[len(item.token_ids) - len(tokens):] if item.logprobs else None
                        skip = max(0, skip - len(item.token_ids))
                        sent += len(tokens)
                        if tokens:  # k tokens after t seconds: k gaps of t/k
                            now = time.perf_counter()
                            if last is not None:
                                gaps += [(now - last) / len(tokens)] * len(tokens)
                            last = now
                        if text.stopped or not tokens:
                            continue
                        pushed = 0
                        delta = ""
                        for t in tokens:
                            if text.stopped:
                                break
                            delta += text.push(t)
                            pushed += 1
                        if text.stopped:
                            await router.cancel.remote(this.request_id)
                        if delta or lps:
                            yield delta, (lps[:pushed] if lps else None), None
                break
            except (ray.exceptions.RayActorError, RouterSilent):
                if sent and not replayable:
                    raise _unavailable("the router restarted under this request; retry it") from None
                attempt += 1
                metrics.failover(admission.tenant)
        else:
            raise _unavailable("every router this request ran on failed under it; retry shortly")
    except ApiError:
        raise
    except Exception as exc:  # noqa: BLE001 - mapped, or re-raised as the bug it is
        mapped = api_error(exc, "context_id")
        if mapped is None:
            raise
        raise mapped from None
    finally:
        admission.release(len(req.prompt_ids) + (result.completion_tokens if result is not None else 0))
    tail = text.flush()
    if tail:
        yield tail, None, None
    kept = len(text.ids)  # tokens up to the one that completed a stop string
    result = dataclasses.replace(result, request_id=req.request_id,
                                 finish_reason="stop" if text.stopped else result.finish_reason,
                                 logprobs=result.logprobs[:kept] if result.logprobs is not None else None)
    metrics.record(admission.tenant, result, gaps)
    if done is not None:
        done(admission.tenant, result)
    yield "", None, result

