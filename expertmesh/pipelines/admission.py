"""Admission at a Serve replica: its queue of requests in flight and the tenants' limits.

The queue is the replica's own (`max_queue`: more in flight is a 503); the limits (concurrency,
token rate) are every replica's together, kept in one named `TenantLimits` actor. A request's
tokens (prompt + max_tokens) are reserved when it is admitted; what it did not use is given back
when it ends (`Admission.release`, once).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from expertmesh.pipelines.api_errors import ApiError, _cause
from expertmesh.platform.tenancy import RateLimited


GAUGE_S = 2.0  # the requests-in-flight gauge is set this often


class Admission:
    """An admitted request's hold on the replica's queue and its tenant's limits (released once)."""

    def __init__(self, queue: "AdmissionQueue", tenant: str, reserved_tokens: int) -> None:
        self.queue, self.tenant, self.reserved = queue, tenant, reserved_tokens
        self.done = False

    def release(self, used_tokens: int) -> None:
        if self.done:
            return
        self.done = True
        q = self.queue
        q.in_flight -= 1
        q.limits.release.remote(self.tenant, max(0, self.reserved - used_tokens) if used_tokens else 0, q.holder)


class AdmissionQueue:
    """The replica's requests in flight (at most `max_queue`) and the shared `TenantLimits` actor."""

    def __init__(self, limits: Any, metrics: Any, max_queue: int, holder: str) -> None:
        self.limits, self.metrics, self.max_queue, self.holder = limits, metrics, max_queue, holder
        self.in_flight = 0
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
        try:
            await self.limits.acquire.remote(tenant, reserve, self.holder)
        except Exception as exc:  # noqa: BLE001 - RateLimited arrives wrapped by Ray
            self.in_flight -= 1
            cause = _cause(exc)
            if not isinstance(cause, RateLimited):
                raise
            self.metrics.refused.inc(1, {"tenant": tenant, "status": "429", "reason": cause.reason})
            raise ApiError(429, str(_cause(exc)), "rate_limit_exceeded", code="rate_limit_exceeded") from None
        return Admission(self, tenant, reserve)
