"""Silent loss of a member: a host whose link is cut, or a frozen VM, closes no connection, so a
step would wait for its reply until STEP_TIMEOUT_S. While a step has run longer than STALL_S,
the router's watch asks Ray's node table (`ray.nodes()`, public, served by the GCS) every
POLL_S whether each member's host is alive; a member on a host Ray has declared dead has its
connection closed, so the step fails at once with a transport error and the router's recovery
takes over (by then Ray reports the actor RESTARTING or DEAD: it is left out of the next
group, and its segments or experts are served by another actor, takeover.py).

A member that is slow but alive is never cut: only Ray's verdict on its host counts. The time
from a cut link to a failed step is therefore Ray's node failure detection (its GCS health
check of every raylet: the chart's `head.nodeFailureDetection`, 5-15 s there) plus at most
POLL_S. A control store that does not answer says nothing: the step goes on waiting.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import ray

STALL_S = 2.0  # a step running longer than this has its members' hosts checked
POLL_S = 1.0  # how often, while it runs
log = logging.getLogger("expertmesh.dataplane")


def dead_nodes() -> set[str] | None:
    """The node ids Ray's node table reports not alive (None: Ray could not be asked)."""
    try:
        return {n["NodeID"] for n in ray.nodes() if not n.get("Alive")}
    except Exception:  # noqa: BLE001 - a control store that does not answer: no verdict
        return None


class StepWatch:
    """A daemon thread of the router's exchange. `running()` says since when the current step
    runs (None between steps); `members()` gives {rank: node id} of the current group;
    `cut(ranks, why)` closes those members' connections (the step's reads fail at once)."""

    def __init__(self, running: Callable[[], float | None], members: Callable[[], dict[int, str]],
                 cut: Callable[[list[int], str], None]) -> None:
        self.running, self.members, self.cut = running, members, cut
        self.cuts = 0  # members cut since the router started (its stats)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="expertmesh-step-watch")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the watch never dies; the step timeout still bounds the step
                log.exception("data plane: the step watch failed a check")

    def check(self) -> list[int]:
        """Cut the members on hosts Ray declared dead, if a step has run past STALL_S."""
        since = self.running()
        if since is None or time.monotonic() - since < STALL_S:
            return []
        members = self.members()
        dead = dead_nodes() if members else None
        lost = sorted(rank for rank, node in members.items() if dead and node in dead)
        if lost:
            why = f"Ray declared the host(s) of rank(s) {lost} dead while a step waited for them"
            log.warning("data plane: %s; closing their connections", why)
            self.cut(lost, why)
            self.cuts += len(lost)
        return lost

    def close(self) -> None:
        self._stop.set()


def watch_exchange(ex: Any) -> StepWatch:
    """The watch of a CollectiveExchange (collective.py): its step clock, members and group."""
    def cut(ranks: list[int], why: str) -> None:
        pg = ex._pg
        if pg is None:
            return
        close_peer = getattr(pg, "close_peer", None)  # a process group cannot close one pair: abort it
        if close_peer is None:
            pg.abort()
            return
        for rank in ranks:
            close_peer(rank)

    return StepWatch(lambda: ex.step_started, lambda: dict(ex.member_nodes), cut)
