"""Admission at a Serve replica (pipelines/admission.py) when the shared tenant limits do not
answer (their actor lives on the head; the head lost): the replica admits by its own limits
within SHARED_WAIT_S, and the acquire it gave up on holds nothing once the actor answers again."""

import asyncio
import time

import pytest
import ray

from expertmesh.pipelines import admission
from expertmesh.pipelines.admission import AdmissionQueue
from expertmesh.pipelines.api_errors import ApiError
from expertmesh.pipelines.tenant_limits import TenantLimits
from expertmesh.platform.tenancy import Tenants, TenantsFile

SPEC = {"tenants": [{"name": "solo", "api_key_sha256": "a" * 64, "max_concurrent_requests": 1,
                     "tokens_per_minute": 10_000, "max_context_tokens": 10}]}
pytestmark = pytest.mark.ray


class _Metric:
    def set(self, *_):
        pass

    def inc(self, *_):
        pass


class _Metrics:
    queue = refused = _Metric()


def queue(limits) -> AdmissionQueue:
    return AdmissionQueue(limits, _Metrics(), 8, "replica-a", Tenants(TenantsFile.model_validate(SPEC)))


def in_flight(limits) -> int:
    return ray.get(limits.__ray_call__.remote(lambda self: self.tenants.in_flight()["solo"]), timeout=30)


def tickets(limits) -> tuple[int, int]:
    return ray.get(limits.__ray_call__.remote(lambda self: (len(self.admitted), len(self.cancelled))), timeout=30)


def test_shared_limits_that_do_not_answer_give_way_to_the_replicas_own(ray_cluster):
    limits = TenantLimits.remote(SPEC)
    ray.get(limits.__ray_ready__.remote(), timeout=60)  # started (a replica's first call waits for it too)
    q = queue(limits)

    async def go():
        first = await q.admit("solo", 10)  # the shared limits
        assert first.ticket is not None and in_flight(limits) == 1
        first.release(10)
        busy = limits.__ray_call__.remote(lambda self: time.sleep(5))  # the actor does not answer for 5 s
        t0 = time.monotonic()
        second = await q.admit("solo", 10)  # the shared acquire waits behind it: the replica's own limits
        waited = time.monotonic() - t0
        assert second.ticket is None and admission.SHARED_WAIT_S <= waited < admission.SHARED_WAIT_S + 1.5
        t0 = time.monotonic()
        with pytest.raises(ApiError, match="1 requests in flight"):  # held to the tenant's limits, locally
            await q.admit("solo", 10)
        assert time.monotonic() - t0 < 0.5  # no second wait while the shared limits are away
        second.release(10)
        ray.get(busy, timeout=30)
        # the acquire given up ran after the wait and holds nothing once its cancel ran too (an async
        # actor runs queued calls in no set order: the read may come between the two)
        deadline = time.monotonic() + 10
        while (held := (in_flight(limits), *tickets(limits))) != (0, 0, 0) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert held == (0, 0, 0)
        q.shared_away_until = 0.0
        third = await q.admit("solo", 10)
        assert third.ticket is not None and in_flight(limits) == 1  # the shared limits again
        third.release(10)
        assert q.local_admissions == 1

    asyncio.run(go())
    ray.kill(limits)


def test_an_acquire_is_cancelled_before_or_after_it_ran(ray_cluster):
    limits = TenantLimits.remote(SPEC)
    ray.get(limits.cancel.remote("t1"))  # given up before it ran: it takes nothing
    assert ray.get(limits.acquire.remote("solo", 10, "r", "t1")) is False and in_flight(limits) == 0
    assert ray.get(limits.acquire.remote("solo", 10, "r", "t2")) is True and in_flight(limits) == 1
    ray.get(limits.cancel.remote("t2"))  # given up after it ran: what it took goes back
    assert in_flight(limits) == 0
    ray.get(limits.release.remote("solo", 10, "r", "t2"))  # a late release of a cancelled ticket changes nothing
    assert ray.get(limits.acquire.remote("solo", 10, "r", "t3")) is True
    with pytest.raises(Exception, match="1 requests in flight"):
        ray.get(limits.acquire.remote("solo", 10, "r", "t4"))
    ray.kill(limits)


def test_shared_limits_gone_for_good_never_hang_an_admission(ray_cluster):
    limits = TenantLimits.options(max_restarts=0).remote(SPEC)
    ray.get(limits.__ray_ready__.remote())
    ray.kill(limits, no_restart=True)
    with pytest.raises(ray.exceptions.RayActorError):  # gone (ray.kill returns before the actor is)
        ray.get(limits.__ray_ready__.remote(), timeout=30)
    q = queue(limits)

    async def go():
        t0 = time.monotonic()
        got = await q.admit("solo", 10)
        assert got.ticket is None and time.monotonic() - t0 < admission.SHARED_WAIT_S + 1.5
        got.release(10)

    asyncio.run(go())
