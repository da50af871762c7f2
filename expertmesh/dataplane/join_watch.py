"""Watching the actors asked to join a data-plane group: one that is gone does not hold it up.

The router asks every actor Ray reports alive to join (a Ray call each) and waits for their
connections. While it waits it checks, about every CHECK_S, on the actors still missing: one
whose join call failed (Ray declared it dead) or that Ray no longer reports alive is left out,
and the group forms without it. A left-out context shard's segments are served from the store
by the others, a left-out expert group's experts by another group that loads them (takeover.py),
until Ray reports it alive again.
"""

from __future__ import annotations

from typing import Any, Callable

import ray

from expertmesh.dataplane.liveness import down


def join_check(refs: dict[int, Any], peers: dict[int, tuple[Any, int | None, int | None]]
               ) -> Callable[[set[int]], set[int]]:
    """check(missing ranks) -> ranks to stop waiting for, for SocketGroup.accept. refs[rank] is
    that rank's join call; peers[rank] = (handle, shard, group)."""
    def check(missing: set[int]) -> set[int]:
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=0)
        done = {id(r) for r in ready}
        give_up = set()
        for rank in sorted(missing):
            if id(refs[rank]) in done:
                try:
                    ray.get(refs[rank], timeout=0)
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError):
                    give_up.add(rank)
            if down(peers[rank][0]) is not None:
                give_up.add(rank)
        return give_up
    return check

