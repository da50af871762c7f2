"""Snapshots with ids, for listeners that ask "anything newer than id N?" (Ray Serve's
`serve/_private/long_poll.py` keeps a controller's state the same way).

The host keeps each key's latest value with the snapshot id of its change (one counter for all
keys) and an epoch drawn at start. A listener presents the (epoch, id) it holds: when the host
has something newer the answer comes at once, else when something changes (or after
`LISTEN_S`, empty: the listener asks again). A listener of another epoch (the host restarted)
or with nothing yet (epoch "", id 0) gets every value. No fixed sleep, no broadcast written by
hand: a restart of either side resumes from ids.

The host also knows which id each listener last presented, i.e. what it has applied: `settled`
waits until the named listeners hold the latest id (a router's change is then known to the
mesh's other routers before its call returns).

No Ray here: the router (directory.py) serves it as an actor method; tests drive it directly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
import uuid
from typing import Any, Iterable

LISTEN_S = (20.0, 40.0)  # a listen with nothing new returns empty after this long (drawn: no herd)
NOTHING = ("", 0)  # what a listener that holds nothing presents


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """An answer: the host's epoch and latest id, and the values changed after the id presented
    (every value when `full`: the listener held nothing of this epoch)."""

    epoch: str
    id: int
    values: tuple[Any, ...]
    full: bool = False

    @property
    def held(self) -> tuple[str, int]:
        """What the listener presents next time."""
        return self.epoch, self.id


class Snapshots:
    def __init__(self) -> None:
        self.epoch = uuid.uuid4().hex[:12]
        self.id = 0
        self._values: dict[str, tuple[int, Any]] = {}  # key -> (id of its last change, value), oldest first
        self._held: dict[str, int] = {}  # listener -> the id of this epoch it last presented
        self._waiters: set[asyncio.Future] = set()

    def publish(self, key: str, value: Any) -> int:
        """Set a key's value; every listener waiting is answered. Returns the new id."""
        self.id += 1
        self._values.pop(key, None)  # re-inserted last: the dict stays in id order
        self._values[key] = (self.id, value)
        self._wake()
        return self.id

    def forget(self, key: str) -> None:
        """No longer serve a key (listeners behind it never learn its last value)."""
        self._values.pop(key, None)

    def since(self, held: tuple[str, int]) -> Snapshot:
        """What a listener holding `held` has not seen, now (nothing when it is up to date)."""
        epoch, seen = held
        if epoch != self.epoch:
            return Snapshot(self.epoch, self.id, tuple(v for _, v in self._values.values()), full=True)
        newer = []
        for i, value in reversed(self._values.values()):  # newest first: stop at the first one seen
            if i <= seen:
                break
            newer.append(value)
        return Snapshot(self.epoch, self.id, tuple(reversed(newer)))

    async def listen(self, listener: str, held: tuple[str, int], timeout_s: float | None = None) -> Snapshot:
        """Answer a listener: at once when it is behind, else at the next change, else (after
        `timeout_s`, by default drawn from LISTEN_S) with nothing new."""
        self._held[listener] = held[1] if held[0] == self.epoch else 0
        self._wake()  # a settle waiting for this listener
        deadline = time.monotonic() + (random.uniform(*LISTEN_S) if timeout_s is None else timeout_s)
        while held[0] == self.epoch and held[1] >= self.id:
            if not await self._changed(deadline - time.monotonic()):
                break
        return self.since(held)

    async def settled(self, listeners: Iterable[str], timeout_s: float) -> list[str]:
        """Wait until each listener holds the latest id (it asked again after applying it), at
        most `timeout_s`; returns those that did not."""
        target, deadline = self.id, time.monotonic() + timeout_s
        behind = [n for n in listeners if self._held.get(n, -1) < target]
        while behind and await self._changed(deadline - time.monotonic()):
            behind = [n for n in behind if self._held.get(n, -1) < target]
        return behind

    def holds(self, listener: str) -> int | None:
        """The id of this epoch a listener last presented (None: it never asked)."""
        return self._held.get(listener)

    async def _changed(self, timeout_s: float) -> bool:
        """Wait for a publish or a listener's ask; False after `timeout_s`."""
        if timeout_s <= 0:
            return False
        fut = asyncio.get_running_loop().create_future()
        self._waiters.add(fut)
        try:
            await asyncio.wait_for(fut, timeout_s)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            self._waiters.discard(fut)

    def _wake(self) -> None:
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()
