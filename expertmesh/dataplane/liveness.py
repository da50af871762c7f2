"""What Ray says about the mesh's actors: alive, restarting, waiting for a host, or dead.

The router asks Ray's control store (the GCS actor table, about half a millisecond per actor)
instead of waiting out a timeout: an actor whose process or host is gone is RESTARTING (or
PENDING_CREATION while no host has room for it) as soon as Ray has noticed, and DEAD once Ray
gives up on it. How fast Ray notices a lost host is Ray's node health check (the chart's
`head.nodeFailureDetection`); a lost process is noticed at once.

Actors the router leaves out of the data plane because Ray does not report them alive come
back in when Ray does (`RECHECK_S`). While the control store cannot be asked (the head
restarting), Ray's last answer about each actor stands; one it never answered for is UNKNOWN,
which is never alive. In-process objects (tests, the single-process mesh) are always alive.
"""

from __future__ import annotations

import time
from typing import Any

import ray

ALIVE = "ALIVE"
UNKNOWN = "UNKNOWN"  # Ray could not be asked and never answered for this actor: never counted alive
REMOVED = "REMOVED"  # taken out of the mesh (its handle is None): never alive again
RECHECK_S = 1.0  # while an actor is left out, how often the router asks whether it is back
RETRY_S = 30.0  # one left out while Ray called it alive is tried again after this long


def actor_row(handle: Any) -> dict:
    """Ray's record of an actor in the GCS actor table (State, NumRestarts, Name, IsDetached, ...)."""
    from ray._private.state import state

    return state.actor_table(handle._actor_id.hex())


def actor_info(handle: Any) -> tuple[str, int]:
    """Ray's state of an actor (ALIVE, RESTARTING, PENDING_CREATION, DEPENDENCIES_UNREADY, DEAD,
    or UNKNOWN) and how many times Ray has restarted it. None (an actor taken out of the mesh
    by the mesh itself: remove_shards, remove_groups) is REMOVED."""
    if handle is None:
        return REMOVED, 0
    if not isinstance(handle, ray.actor.ActorHandle):
        return ALIVE, 0
    key = handle._actor_id.hex()
    try:
        row = actor_row(handle)
        info = (row.get("State") or UNKNOWN, int(row.get("NumRestarts") or 0))
    except Exception:  # noqa: BLE001 - a control store that does not answer: what it said last
        return _last.get(key, (UNKNOWN, 0))
    if info[0] != UNKNOWN:
        _last[key] = info
    return info


# Ray's last answer per actor: while the control store cannot be asked (the head restarting),
# members stay members and the left-out stay out; an actor Ray never answered for is UNKNOWN.
_last: dict[str, tuple[str, int]] = {}


def actor_state(handle: Any) -> str:
    return actor_info(handle)[0]


def back(handle: Any, when_left: tuple[str, int, float]) -> bool:
    """Is an actor left out with `when_left` = (state, restarts, time.monotonic()) then able to
    serve again? One left out while Ray still called it alive (its join failed: its host
    unreachable and not yet declared dead) is back once Ray has restarted it, not while Ray
    still reports the old one (or, in case the failure was passing, after RETRY_S)."""
    state, restarts = actor_info(handle)
    return state == ALIVE and (when_left[0] != ALIVE or restarts > when_left[1]
                               or time.monotonic() - when_left[2] > RETRY_S)


def down(handle: Any) -> str | None:
    """None if Ray reports the actor alive (now, or last time it could be asked); else its state
    (UNKNOWN: Ray never answered for it)."""
    s = actor_state(handle)
    return None if s == ALIVE else s


class LeftOut:
    """The actors (by index) left out of the data plane, each with what Ray said when it was."""

    def __init__(self) -> None:
        self.since: dict[int, tuple[str, int, float]] = {}

    def refresh(self, handles: list[Any]) -> dict[int, str]:
        """Take back those that are back, leave out those Ray does not report alive; index ->
        why (Ray's state, or UNREACHABLE: its join failed while Ray still called it alive)."""
        for i in [i for i, when in self.since.items() if back(handles[i], when)]:
            del self.since[i]
        for i, h in enumerate(handles):
            if i not in self.since and (info := actor_info(h))[0] != ALIVE:
                self.since[i] = (*info, time.monotonic())
        return self.why()

    def add(self, i: int, handle: Any) -> None:
        self.since[i] = (*actor_info(handle), time.monotonic())

    def why(self) -> dict[int, str]:
        return {i: "UNREACHABLE" if s == ALIVE else s for i, (s, _, _) in self.since.items()}

    def any_back(self, handles: list[Any]) -> bool:
        return any(back(handles[i], when) for i, when in self.since.items())
