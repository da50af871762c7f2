"""A mesh's routers as one caller: spreading requests, pinning one, failing over.

Each call goes to the router with the fewest calls in flight from this process (ties in turn),
or to the one a caller pins (`router=i`: tests, debugging). A router that dies under a call
(its process or host lost) fails over: the call runs again at once on each other router Ray
reports alive, least busy first (same tokens when greedy or seeded); only when every router
failed under it does the call wait for its first router to come back (Ray restarts it), within
a bound, and run there once more. `attempts` (driver threads: `RouterSet.call`, `Mesh`) and
`attempts_async` (Serve's replicas, over calls and streams) are that one policy. Every call has
a deadline (`call_timeout`): a router that does not answer in time is Unavailable to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from typing import Any, AsyncIterator, Iterator

import ray

from expertmesh.dataplane.liveness import down
from expertmesh.errors import Unavailable

RECOVER_TIMEOUT_S = 60.0  # how long a call waits for a restarting router before it gives up
# Every call to a router has a deadline, so that a router that cannot answer (its host cut off
# before Ray declares it dead, a control store down) never holds its caller for good:
CALL_TIMEOUT_S = 60.0  # a control call (contexts, pool, stats, a drop)
WORK_TIMEOUT_S = 3600.0  # a registration, a rebalance, or a request without a deadline of its own
GRACE_S = 10.0  # past a request's own deadline (the router answers DeadlineExceeded by then)
CHUNK_TIMEOUT_S = 150.0  # a stream's next tokens (a step is bounded by 120 s): past it, the router is lost
WORK = ("register_context", "rebalance", "add_shards", "generate", "forward_logits", "stream")


def call_timeout(method: str, args: tuple) -> float:
    """How long a caller waits for a router's answer to `method(*args)`."""
    if method not in WORK:
        return CALL_TIMEOUT_S
    left = args[0].seconds_left() if args and hasattr(args[0], "seconds_left") else None
    return WORK_TIMEOUT_S if left is None else max(0.0, left) + GRACE_S


def no_answer(router: str, method: str, timeout_s: float) -> Unavailable:
    return Unavailable(f"{router} did not answer {method} within {timeout_s:g} s (its host unreachable, or the "
                       "cluster's control store down); retry later")


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

    def next_after(self, failed: int, tried: list[int], pinned: bool) -> int | None:
        """Where a call goes now that router `failed` died under it: the least busy other router
        that Ray reports alive and the call has not tried, or None (a pinned call, or every
        router tried): the call waits for its first router to come back."""
        if pinned:
            return None
        return next((j for j in self.fallbacks(failed) if j not in tried), None)

    def attempts(self, pin: int | None = None, timeout_s: float = RECOVER_TIMEOUT_S) -> Iterator[int]:
        """The routers one call runs on, in turn, each after the one before died under it (the
        module docstring's policy); ends when the last try failed too. Raises Unavailable when
        the first router does not come back within timeout_s."""
        first = i = self.pick(pin)
        tried: list[int] = []
        while i is not None:
            yield i
            tried.append(i)
            i = self.next_after(i, tried, pin is not None)
        wait_until_back(self.routers[first], self.name(first), timeout_s)
        yield first

    async def attempts_async(self, timeout_s: float = RECOVER_TIMEOUT_S) -> AsyncIterator[int]:
        """`attempts` for an event loop (Ray's GCS reads and the wait for a restart off the loop)."""
        first = i = self.pick()
        tried: list[int] = []
        while i is not None:
            yield i
            tried.append(i)
            i = await asyncio.to_thread(self.next_after, i, tried, False)
        await asyncio.to_thread(wait_until_back, self.routers[first], self.name(first), timeout_s)
        yield first

    def name(self, i: int) -> str:
        return f"router {i}" if len(self.routers) > 1 else "the router"

    def call(self, method: str, *args: Any, pin: int | None = None) -> Any:
        """Run a router method (see the module docstring for which router and what on failure)."""
        timeout_s = call_timeout(method, args)
        for i in self.attempts(pin):
            try:
                with self.busy(i) as router:
                    ref = getattr(router, method).remote(*args)
                    return ray.get(ref, timeout=timeout_s)
            except ray.exceptions.GetTimeoutError:
                ray.cancel(ref)
                raise no_answer(self.name(i), method, timeout_s) from None
            except ray.exceptions.RayActorError as exc:
                failure = exc
        raise Unavailable(f"every router the call ran on failed under it ({failure.__class__.__name__}); "
                          "retry later") from None
