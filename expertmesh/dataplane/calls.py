"""Control calls to mesh actors, bounded: a Ray actor handle or an in-process object alike.

    tell(target, method, *args)              fire and forget
    ask(target, method, *args) -> value      wait (bounded) from a thread that is not an event loop
    call(target, method, *args) -> awaitable the same from an event loop

`ActorExchange` is the part of the exchange contract (engine/exchange.py) that both data planes
implement the same way: releasing a stood-in segment, adopting and releasing experts, by
control calls to the actors.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable

import ray

from expertmesh.engine.exchange import CONTROL_TIMEOUT_S, Exchange
from expertmesh.errors import ExpertMeshError, Unavailable


def tell(target: Any, method: str, *args: Any) -> None:
    """Call an actor's method without awaiting the answer (best effort)."""
    if _remote(target):
        getattr(target, method).remote(*args)
    else:
        getattr(target, method)(*args)


def ask(target: Any, method: str, *args: Any, timeout_s: float = CONTROL_TIMEOUT_S) -> Any:
    """Call an actor's method and wait for its answer (bounded), from a thread that is not an event loop."""
    if not _remote(target):
        return getattr(target, method)(*args)
    try:
        return ray.get(getattr(target, method).remote(*args), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise Unavailable(f"a mesh actor did not answer {method!r} within {timeout_s:g} s; retry later") from None
    except ray.exceptions.RayTaskError as exc:  # the actor's own error (e.g. CapacityError) says what went wrong
        if isinstance(getattr(exc, "cause", None), ExpertMeshError):
            raise exc.cause from None
        raise


async def _bounded(ref, target: Any, method: str, timeout_s: float):
    try:
        return await asyncio.wait_for(ref, timeout_s)
    except asyncio.TimeoutError:
        name = target._actor_id.hex()[:12]
        try:
            from ray.util.state import get_actor

            state = await asyncio.to_thread(get_actor, target._actor_id.hex(), timeout=5)
            name = f"{state.class_name} {state.name or name} ({state.state})" if state else name
        except Exception:  # noqa: BLE001 - the state API is best effort here
            pass
        raise Unavailable(f"actor {name} did not answer {method!r} within {timeout_s:g} s (restarting, or waiting "
                          "for a host with its resources); retry later") from None


def _remote(target: Any) -> bool:
    return isinstance(target, ray.actor.ActorHandle)


def call(target: Any, method: str, *args: Any, timeout_s: float | None = None) -> Awaitable:
    """Invoke a control method (begin, append, open, drop, ...) of an actor handle (remote) or
    a local object, as an awaitable. A remote call that gets no answer within `timeout_s`
    (CONTROL_TIMEOUT_S by default: an actor that Ray keeps restarting, or that waits for a host
    to be placed on, queues calls without end) fails with Unavailable naming the actor."""
    if _remote(target):
        return _bounded(getattr(target, method).remote(*args), target, method,
                        CONTROL_TIMEOUT_S if timeout_s is None else timeout_s)
    fut = asyncio.get_running_loop().create_future()
    try:
        fut.set_result(getattr(target, method)(*args))
    except Exception as exc:  # noqa: BLE001 - delivered to the awaiting caller
        fut.set_exception(exc)
    return fut


class ActorExchange(Exchange):
    """What both data planes do by control calls (outside steps)."""

    def release(self, shard: int, context_id: str) -> None:
        tell(self.shard_handle(shard), "drop", context_id)

    def adopt(self, group: int, experts: range) -> None:
        ask(self.group_handle(group), "adopt_experts", experts.start, experts.stop, self.router)

    def release_experts(self, group: int, experts: range) -> None:
        tell(self.group_handle(group), "release_experts", experts.start, experts.stop, self.router)
