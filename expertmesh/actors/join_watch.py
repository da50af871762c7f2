"""Watching the actors asked to join a data-plane group: a dead one ends the wait at once.

The router asks every actor to join (a Ray call each) and waits for their connections. An
actor Ray has declared dead (its process gone and no restart left, or its node lost and the
actor not restartable) answers that call with an error at once; one that Ray is restarting
answers when it is back. So the wait checks the calls that already answered: an error there
names the actor and ends the formation now, instead of after the join timeout.
"""

from __future__ import annotations

from typing import Any, Callable

import ray


class MemberLost(RuntimeError):
    """An actor asked to join the group is dead (Ray says so)."""


def join_check(refs: list, peers: list[tuple[Any, int | None, int | None]]) -> Callable[[set[int]], None]:
    """check(missing ranks) for SocketGroup.accept: raises MemberLost naming a missing rank's
    actor whose join call failed. refs[r - 1] is rank r's call; peers[r - 1] = (handle, shard, group)."""
    def check(missing: set[int]) -> None:
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        done = {id(r) for r in ready}
        for rank in sorted(missing):
            ref = refs[rank - 1]
            if id(ref) not in done:
                continue
            try:
                ray.get(ref, timeout=0)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                raise MemberLost(f"{describe(peers[rank - 1])} (rank {rank}) cannot join: "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    return check


def describe(peer: tuple[Any, int | None, int | None]) -> str:
    _, shard, group = peer
    parts = ([f"context shard {shard}"] if shard is not None else []) + (
        [f"expert group {group}"] if group is not None else [])
    return " + ".join(parts) or "a mesh actor"
