"""A mesh's routers as one caller: spreading requests, pinning one, failing over.

Each call goes to the router with the fewest calls in flight from this process (ties in turn),
or to the one a caller pins (`router=i`: tests, debugging). A router that dies under a call
(its process or host lost) fails over: the call runs again on another router at once (same
tokens when greedy or seeded: nothing of a request's output has reached the caller of a
non-streaming call); only when every router failed does the call wait for the first one to
come back (Ray restarts it), within RECOVER_TIMEOUT_S, and run once more.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from typing import Any, Iterator

import ray

from expertmesh.actors.liveness import down
from expertmesh.errors import Unavailable

RECOVER_TIMEOUT_S = 60.0  # how long a call waits for a restarting router before it gives up


def wait_until_back(actor, what: str, timeout_s: float) -> float:
    """Block until a restarting actor answers again; return the seconds waited, or raise
    Unavailable (retryable) after timeout_s, or once it is clearly not coming back."""
    t0 = time.monotonic()
    while True:
        left = timeout_s - (time.monotonic() - t0)
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=max(0.1, min(left, 5.0)))
            return time.monotonic() - t0
        except ray.exceptions.ActorDiedError as exc:
            # calls to a restarting actor wait for it; "died" after a short grace (the handle
            # learning of the restart) means it will not restart (killed for good, node gone)
            if time.monotonic() - t0 > 2.0:
                raise Unavailable(f"{what} died and is not coming back: {exc}") from None
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
            pass
        if left <= 0:
            raise Unavailable(f"{what} is restarting and did not answer within {timeout_s:g} s; retry later")
        time.sleep(0.05)


class RouterSet:
    def __init__(self, routers: list[Any]) -> None:
        self.routers = list(routers)
        self._in_flight = [0] * len(self.routers)
        self._turn = itertools.count()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.routers)

    def pick(self, pin: int | None = None) -> int:
        """The router for the next call: `pin`, or the least busy (ties in turn)."""
        n = len(self.routers)
        if pin is not None:
            if isinstance(pin, bool) or not isinstance(pin, int) or not 0 <= pin < n:
                raise ValueError(f"router must be an integer in 0..{n - 1} (the mesh has {n} router(s)), got {pin!r}")
            return pin
        with self._lock:
            start = next(self._turn) % n
            return min(range(n), key=lambda i: (self._in_flight[i], (i - start) % n))

    def fallbacks(self, failed: int) -> list[int]:
        """The other routers Ray reports alive, least busy first: where a failed call goes next."""
        others = [i for i in range(len(self.routers)) if i != failed and not down(self.routers[i])]
        return sorted(others, key=lambda i: self._in_flight[i])

    @contextlib.contextmanager
    def busy(self, i: int) -> Iterator[Any]:
        """Count a call in flight on router i while it runs; yields its handle."""
        with self._lock:
            self._in_flight[i] += 1
        try:
            yield self.routers[i]
        finally:
            with self._lock:
                self._in_flight[i] -= 1

    def call(self, method: str, *args: Any, pin: int | None = None) -> Any:
        """Run a router method (see the module docstring for which router and what on failure)."""
        first = i = self.pick(pin)
        tried = []
        while True:
            try:
                with self.busy(i) as router:
                    return ray.get(getattr(router, method).remote(*args))
            except ray.exceptions.RayActorError:
                tried.append(i)
                others = [] if pin is not None else [j for j in self.fallbacks(i) if j not in tried]
                if not others:
                    break
                i = others[0]
        what = f"router {first}" if len(self.routers) > 1 else "the router"
        wait_until_back(self.routers[first], what, RECOVER_TIMEOUT_S)
        try:
            with self.busy(first) as router:
                return ray.get(getattr(router, method).remote(*args))
        except ray.exceptions.RayActorError as exc:
            raise Unavailable(f"{what} failed twice under this request ({exc.__class__.__name__}); "
                              "retry later") from None
