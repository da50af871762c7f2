"""Admission at a Serve replica: its queue of requests in flight and the tenants' limits.

The queue is the replica's own (`max_queue`: more in flight is a 503); the limits (concurrency,
token rate) are every replica's together, kept in one named `TenantLimits` actor. A request's
tokens (prompt + max_tokens) are reserved when it is admitted; what it did not use is given back
when it ends (`Admission.release`, once).

That actor lives on the head. While it does not answer within SHARED_WAIT_S (the head lost and
not yet back: GCS fault tolerance keeps the rest serving), the replica admits by its own copy of
the tenants' limits (`local`: each replica then holds each tenant to its limits alone) and gives
the shared actor a SHARED_RETRY_S rest before asking it again; the acquire it gave up on is
cancelled by its ticket (tenant_limits.py), so nothing stays held there.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from typing import Any

import ray

from expertmesh.pipelines.api_errors import ApiError, _cause
from expertmesh.platform.tenancy import RateLimited


GAUGE_S = 2.0  # the requests-in-flight gauge is set this often
SHARED_WAIT_S = 2.0  # an admission waits this long for the shared limits before the replica's own decide
SHARED_RETRY_S = 5.0  # after one did not answer, admissions go by the replica's own limits this long

log = logging.getLogger(__name__)


class Admission:
    """An admitted request's hold on the replica's queue and its tenant's limits (released once):
    the shared ones (`ticket`), or the replica's own (`ticket` None)."""

    def __init__(self, queue: "AdmissionQueue", tenant: str, reserved_tokens: int, ticket: str | None) -> None:
        self.queue, self.tenant, self.reserved, self.ticket = queue, tenant, reserved_tokens, ticket
        self.done = False

    def release(self, used_tokens: int) -> None:
        if self.done:
            return
        self.done = True
        q = self.queue
        q.in_flight -= 1
        unused = max(0, self.reserved - used_tokens) if used_tokens else 0
        if self.ticket is None:
            q.local.release(self.tenant, unused, q.holder)
        else:
            q.limits.release.remote(self.tenant, unused, q.holder, self.ticket)


class AdmissionQueue:
    """The replica's requests in flight (at most `max_queue`), the shared `TenantLimits` actor and
    the replica's own limits (`local`, a `Tenants`) for while that actor is away."""

    def __init__(self, limits: Any, metrics: Any, max_queue: int, holder: str, local: Any) -> None:
        self.limits, self.metrics, self.max_queue, self.holder, self.local = limits, metrics, max_queue, holder, local
        self.in_flight = 0
        self.shared_away_until = 0.0  # monotonic: until then admissions go by the local limits
        self.local_admissions = 0  # requests admitted by the local limits (the shared actor away)
        # the gauge is set every GAUGE_S, idle too (Ray drops a gauge not set for two export intervals)
        threading.Thread(target=self._gauge, daemon=True, name="expertmesh-queue-gauge").start()

    def _gauge(self) -> None:
        while True:
            self.metrics.queue.set(self.in_flight)
            time.sleep(GAUGE_S)

    async def admit(self, tenant: str, reserve: int) -> Admission:
        """A place in the queue and `reserve` tokens of the tenant's limits, or 503 / 429."""
        if self.in_flight >= self.max_queue:
            self.metrics.refused.inc(1, {"tenant": tenant, "status": "503", "reason": "queue_full"})
            raise ApiError(503, f"server queue is full ({self.max_queue} requests); retry later",
                           "server_overloaded", code="queue_full")
        self.in_flight += 1  # the slot is taken before awaiting the limits actor: concurrent requests see it
        ticket: str | None = None
        try:
            if time.monotonic() >= self.shared_away_until:
                ticket = uuid.uuid4().hex
                if not await self._shared(tenant, reserve, ticket):
                    ticket = None
            if ticket is None:
                self.local.acquire(tenant, reserve, self.holder)
                self.local_admissions += 1
        except Exception as exc:  # noqa: BLE001 - RateLimited arrives wrapped by Ray
            self.in_flight -= 1
            cause = _cause(exc)
            if not isinstance(cause, RateLimited):
                raise
            self.metrics.refused.inc(1, {"tenant": tenant, "status": "429", "reason": cause.reason})
            raise ApiError(429, str(_cause(exc)), "rate_limit_exceeded", code="rate_limit_exceeded") from None
        return Admission(self, tenant, reserve, ticket)

    async def _shared(self, tenant: str, reserve: int, ticket: str) -> bool:
        """Acquire at the shared actor (True), or False when it did not answer in time or is gone
        (the ticket cancelled there); RateLimited raises."""
        ref = self.limits.acquire.remote(tenant, reserve, self.holder, ticket)
        try:
            return bool(await asyncio.wait_for(asyncio.wrap_future(ref.future()), SHARED_WAIT_S))
        except (asyncio.TimeoutError, ray.exceptions.RayActorError) as exc:
            self.limits.cancel.remote(ticket)  # runs after the acquire, whenever the actor is back
            self.shared_away_until = time.monotonic() + SHARED_RETRY_S
            log.warning("the shared tenant limits did not answer within %.0f s (%s): admitting by this replica's "
                        "own limits for %.0f s", SHARED_WAIT_S, type(exc).__name__, SHARED_RETRY_S)
            return False
