"""Watching the actors asked to join a data-plane group: one that is gone does not hold it up.

The router asks every actor to join (a Ray call each) and waits for their connections. While
it waits it checks, about every CHECK_S, on the actors still missing:
- an expert group whose join call failed (Ray declared it dead) ends the formation at once,
  naming it;
- a context shard (alone in its actor) that Ray no longer reports alive, or whose join call
  failed, is left out: the group
  forms without it and its segments are served from the store by the others (takeover.py)
  until Ray reports it alive again. An expert group is waited for (its experts have no other
  home yet).
"""

from __future__ import annotations

from typing import Any, Callable

import ray

from expertmesh.actors.liveness import down


class MemberLost(RuntimeError):
    """An actor asked to join the group is dead (Ray says so)."""


def join_check(refs: dict[int, Any], peers: dict[int, tuple[Any, int | None, int | None]]
               ) -> Callable[[set[int]], set[int]]:
    """check(missing ranks) -> ranks to stop waiting for, for SocketGroup.accept; raises
    MemberLost naming a missing rank's actor whose join call failed. refs[rank] is that rank's
    join call; peers[rank] = (handle, shard, group)."""
    def check(missing: set[int]) -> set[int]:
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=0)
        done = {id(r) for r in ready}
        give_up = set()
        for rank in sorted(missing):
            ref, shard_only = refs[rank], peers[rank][2] is None
            if id(ref) in done:
                try:
                    ray.get(ref, timeout=0)
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                    if not shard_only:
                        raise MemberLost(f"{describe(peers[rank])} (rank {rank}) cannot join: "
                                         f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
                    give_up.add(rank)
            if shard_only and down(peers[rank][0]) is not None:
                give_up.add(rank)
        return give_up
    return check


def describe(peer: tuple[Any, int | None, int | None]) -> str:
    _, shard, group = peer
    parts = ([f"context shard {shard}"] if shard is not None else []) + (
        [f"expert group {group}"] if group is not None else [])
    return " + ".join(parts) or "a mesh actor"
