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
    whole_target() -> bool; whole(request, ...) -> reply
                                        a step sent whole to the one actor holding every
                                        shard and group (engine/whole_step.py), one round trip
    abort(error) -> the error the step fails with (after a failed step: the actors' own, if any)
Outside steps:
    absent() -> ({shard: state}, {group: state})   context shards and expert groups Ray does not
                                        report alive, which the next plan must not use
    release(shard, context_id)          a shard forgets a segment it stood in for (takeover.py)
    adopt(group, experts) / release_experts(group, experts)
                                        a group holds a lost group's experts too, or no longer

The implementations live in `expertmesh.dataplane`: `TaskExchange` (task.py) calls the actors' `attend` / `compute` once per layer: in-process objects (the
single-process router, and CPU tests) or Ray actor handles (one Ray task per actor per layer,
the reference path). `CollectiveExchange` (collective.py) makes one Ray call per actor per
step and moves the per-layer tensors over a torch.distributed process group. Both give the
same numbers: the wire format is fp32 either way.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from expertmesh.engine.step_plan import StepPlan

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

    def whole_target(self) -> bool:
        """Can the next step go whole to one actor holding every shard and group (whole_step.py)?"""
        return False

    def whole(self, request: Any, vocab: int, experts: int, groups: int) -> Any:
        """Run a step whole there: a WholeRequest in, a WholeReply out (whole_step.py)."""
        raise NotImplementedError

    def abort(self, exc: BaseException) -> BaseException:
        """After a failed step: clean up; return the error the step fails with."""
        return exc

    def absent(self, fresh: bool = False) -> tuple[dict[int, str], dict[int, str]]:
        """The context shards and expert groups that cannot serve now (index -> why). fresh: ask
        now, not what was last heard (a shard a step needs was left out: it may be back)."""
        return {}, {}

    def release(self, shard: int, context_id: str) -> None:
        raise NotImplementedError

    router = ""  # which of the mesh's routers this exchange is (an adopting group counts its routers)

    def adopt(self, group: int, experts: range) -> None:
        raise NotImplementedError

    def release_experts(self, group: int, experts: range) -> None:
        raise NotImplementedError

    def shard_handle(self, shard: int) -> Any:
        raise NotImplementedError

    def group_handle(self, group: int) -> Any:
        raise NotImplementedError

    def add_shards(self, handles: list[Any], first: int) -> None:
        """Context shards added to the mesh, with indices from `first` on."""
        raise NotImplementedError

    def remove_shards(self, shards: set[int]) -> None:
        """Context shards taken out of the mesh (their segments moved off): no step reaches them."""
        raise NotImplementedError

    def add_groups(self, handles: dict[int, Any]) -> None:
        """Expert groups added to the mesh: index -> handle."""
        raise NotImplementedError

    def remove_groups(self, groups: set[int]) -> None:
        """Expert groups taken out of the mesh: no step reaches them again."""
        raise NotImplementedError

    def allow_segments(self, n: int) -> None:
        """Plans may name the segments of n shards (more than the mesh has: collective.py)."""

    def stats(self) -> dict:
        """What the data plane reports in the router's stats (the collective plane: its group)."""
        return {}

    def refresh_metrics(self) -> None:
        """Set its Ray gauges again (Ray drops a gauge not set for two export intervals: an idle
        router's panels would show no data)."""

    def close(self) -> None:
        pass
