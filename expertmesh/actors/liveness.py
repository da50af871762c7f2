"""What Ray says about the mesh's actors: alive, restarting, waiting for a host, or dead.

The router asks Ray's control store (the GCS actor table, about half a millisecond per actor)
instead of waiting out a timeout: an actor whose process or host is gone is RESTARTING (or
PENDING_CREATION while no host has room for it) as soon as Ray has noticed, and DEAD once Ray
gives up on it. How fast Ray notices a lost host is Ray's node health check (the chart's
`healthCheck` settings); a lost process is noticed at once.

Actors the router leaves out of the data plane because Ray does not report them alive come
back in when Ray does (`RECHECK_S`). In-process objects (tests, the single-process mesh) are
always alive.
"""

from __future__ import annotations

from typing import Any

import ray

ALIVE = "ALIVE"
UNKNOWN = "UNKNOWN"  # Ray could not be asked: treated as alive (the caller waits as before)
RECHECK_S = 1.0  # while an actor is left out, how often the router asks whether it is back


def actor_state(handle: Any) -> str:
    """Ray's state of an actor: ALIVE, RESTARTING, PENDING_CREATION, DEPENDENCIES_UNREADY, DEAD
    (or UNKNOWN)."""
    if not isinstance(handle, ray.actor.ActorHandle):
        return ALIVE
    try:
        from ray._private.state import state

        return state.actor_table(handle._actor_id.hex()).get("State") or UNKNOWN
    except Exception:  # noqa: BLE001 - a control store that does not answer: say nothing new
        return UNKNOWN


def down(handle: Any) -> str | None:
    """None if the actor can serve (or Ray cannot tell); else its state."""
    s = actor_state(handle)
    return None if s in (ALIVE, UNKNOWN) else s
