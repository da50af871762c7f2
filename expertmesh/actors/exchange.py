"""The per-layer exchange of a router step: one dispatch/combine contract, two transports.

    begin(plan) -> the step's exchange  a step starts (the collective transport sends each
                                        participating actor its slice of the plan here); the
                                        calls below go to what begin returned
    begin_micro(plans) -> [exchange]    a step of micro-batches (ping_pong.py), one exchange each
    attend(layer, {shard: [(item, q)]}) -> wait() -> {shard: [(out, lse)]}
                                        scatter queries to context shards, gather partials
    experts(layer, {group: (rows, ids)}) -> wait() -> {group: y}
                                        dispatch token rows to expert groups, combine outputs
    end() -> [(layer, shard, item, pages read)]     the step is over
    abort(error) -> the error the step fails with (after a failed step: the actors' own, if any)
Outside steps:
    absent() -> ({shard: state}, {group: state})   context shards and expert groups Ray does not
                                        report alive, which the next plan must not use
    release(shard, context_id)          a shard forgets a segment it stood in for (takeover.py)
    adopt(group, experts) / release_experts(group, experts)
                                        a group holds a lost group's experts too, or no longer

`TaskExchange` calls the actors' `attend` / `compute` once per layer: in-process objects (the
single-process router, and CPU tests) or Ray actor handles (one Ray task per actor per layer,
the reference path). `CollectiveExchange` (collective.py) makes one Ray call per actor per
step and moves the per-layer tensors over a torch.distributed process group. Both give the
same numbers: the wire format is fp32 either way.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

import numpy as np
import ray
import torch

from expertmesh.actors.liveness import RECHECK_S, down
from expertmesh.actors.step_plan import AttendItem, StepPlan
from expertmesh.errors import ExpertMeshError, Unavailable

DATA_PLANES = ("collective", "ray")
TRANSPORTS = ("auto", "socket", "gloo", "nccl")  # the collective plane's (collective.py)
STEP_TIMEOUT_S = 120.0  # a step whose actors do not answer within this fails (nothing hangs)
CONTROL_TIMEOUT_S = 60.0  # a control call (begin, append, open, drop, contexts) likewise


def check_data_plane(value: str) -> str:
    if value not in DATA_PLANES:
        raise ValueError(f"data_plane must be one of {DATA_PLANES}, got {value!r}")
    return value


def check_transport(value: str) -> str:
    if value not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {value!r}")
    return value


class Exchange:
    """The contract (see the module docstring); subclasses implement every method."""

    def begin(self, plan: StepPlan) -> "Exchange":
        raise NotImplementedError

    def begin_micro(self, plans: list[StepPlan]) -> list["Exchange"]:
        """One step of micro-batches (ping_pong.py): an exchange each, in one step."""
        return [self.begin(p) for p in plans]

    def attend(self, layer: int, requests: dict[int, list[tuple[int, torch.Tensor]]]
               ) -> Callable[[], dict[int, list[tuple[torch.Tensor, torch.Tensor]]]]:
        raise NotImplementedError

    def experts(self, layer: int, requests: dict[int, tuple[torch.Tensor, torch.Tensor]]
                ) -> Callable[[], dict[int, torch.Tensor]]:
        raise NotImplementedError

    def end(self) -> list[tuple[int, int, int, dict]]:
        raise NotImplementedError

    def abort(self, exc: BaseException) -> BaseException:
        """After a failed step: clean up; return the error the step fails with."""
        return exc

    def absent(self) -> tuple[dict[int, str], dict[int, str]]:
        return {}, {}

    def release(self, shard: int, context_id: str) -> None:
        tell(self.shard_handle(shard), "drop", context_id)

    router = ""  # which of the mesh's routers this exchange is (an adopting group counts its routers)

    def adopt(self, group: int, experts: range) -> None:
        ask(self.group_handle(group), "adopt_experts", experts.start, experts.stop, self.router)

    def release_experts(self, group: int, experts: range) -> None:
        tell(self.group_handle(group), "release_experts", experts.start, experts.stop, self.router)

    def shard_handle(self, shard: int) -> Any:
        raise NotImplementedError

    def group_handle(self, group: int) -> Any:
        raise NotImplementedError

    def add_shards(self, handles: list[Any]) -> None:
        """Context shards added to the mesh (indices from the current count on)."""
        raise NotImplementedError

    def allow_segments(self, n: int) -> None:
        """Plans may name the segments of n shards (more than the mesh has: collective.py)."""

    def close(self) -> None:
        pass


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


class TaskExchange(Exchange):
    """One call per actor per layer: a method call in-process, or a Ray task. Steps may run
    concurrently (router lanes): each gets its own `_TaskStep`."""

    def __init__(self, shards: list[Any], groups: list[Any], router: str = "") -> None:
        self.shards, self.groups, self.router = shards, groups, router
        self._absent: tuple[dict[int, str], dict[int, str]] = ({}, {})
        self._checked = -RECHECK_S

    def begin(self, plan: StepPlan) -> "_TaskStep":
        return _TaskStep(self.shards, self.groups, plan)

    def absent(self) -> tuple[dict[int, str], dict[int, str]]:
        """Asked of Ray at most every RECHECK_S (a step calls the actors directly: no group)."""
        if time.monotonic() - self._checked >= RECHECK_S:
            self._checked = time.monotonic()
            self._absent = ({i: st for i, h in enumerate(self.shards) if (st := down(h))},
                            {g: st for g, h in enumerate(self.groups) if (st := down(h))})
        return dict(self._absent[0]), dict(self._absent[1])

    def shard_handle(self, shard: int) -> Any:
        return self.shards[shard]

    def add_shards(self, handles: list[Any]) -> None:
        self.shards = [*self.shards, *handles]  # a step in flight keeps the list it began with

    def group_handle(self, group: int) -> Any:
        return self.groups[group]


class _TaskStep(Exchange):
    def __init__(self, shards: list[Any], groups: list[Any], plan: StepPlan) -> None:
        self.shards, self.groups, self._plan = shards, groups, plan
        self._reads: list[tuple[int, int, int, dict]] = []

    def attend(self, layer, requests):
        items_of = self._plan.layers[layer].attend
        calls = {}
        for shard, active in requests.items():
            items = [AttendItem(it.context_id, q.float().cpu().numpy(), it.q_pos, it.visits, it.top_pages, it.segment)
                     for (j, q), it in ((a, items_of[shard][a[0]]) for a in active)]
            calls[shard] = (active, self._call(self.shards[shard], "attend", layer, items))

        def wait():
            out = {}
            for shard, (active, reply) in calls.items():
                res = reply()
                out[shard] = [(torch.from_numpy(np.array(o)), torch.from_numpy(np.array(lse))) for o, lse, _ in res]
                self._reads.extend((layer, shard, j, reads) for (j, _), (_, _, reads) in zip(active, res))
            return out
        return wait

    def experts(self, layer, requests):
        calls = {g: self._call(self.groups[g], "compute", layer, rows.float().cpu().numpy(), ids.cpu().numpy())
                 for g, (rows, ids) in requests.items()}
        return lambda: {g: torch.from_numpy(np.array(reply())) for g, reply in calls.items()}

    def end(self):
        return self._reads

    @staticmethod
    def _call(target: Any, method: str, *args) -> Callable[[], Any]:
        """Start a call; return a function that waits for its result."""
        if _remote(target):
            ref = getattr(target, method).remote(*args)
            return lambda: ray.get(ref, timeout=STEP_TIMEOUT_S)
        result = getattr(target, method)(*args)  # in-process: now
        return lambda: result
