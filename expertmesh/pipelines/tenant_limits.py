"""The tenants' admission state (requests in flight, token buckets), one named actor that every
Serve replica shares, so limits hold across replicas, replacements and autoscaling.

A replica bounds its wait for this actor (admission.py: the head, where it lives, may be away);
one that gave up on an acquire `cancel`s its ticket, so the acquire, should it still run (Ray
retries it once the actor is back), takes nothing or gives back what it took."""

import asyncio
import collections
from typing import Any

import ray

from expertmesh.platform.tenancy import RateLimited, Tenants, TenantsFile


CANCELLED_KEPT = 10_000  # tickets given up before their acquire ran, remembered (the oldest forgotten)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class TenantLimits:
    """The tenants' admission state (requests in flight, token buckets) every replica shares."""

    def __init__(self, tenants: dict | None) -> None:
        self.tenants = Tenants(TenantsFile.model_validate(tenants) if tenants else None)
        self.replicas: dict[str, Any] = {}  # holder id -> its replica's actor handle
        self.admitted: dict[str, tuple[str, int, str]] = {}  # ticket -> (tenant, tokens, holder), until released
        self.cancelled: collections.OrderedDict[str, None] = collections.OrderedDict()  # given up before they ran

    def update(self, tenants: dict | None, holder: str, replica: Any) -> None:
        self.tenants.update(TenantsFile.model_validate(tenants) if tenants else None)
        self.replicas[holder] = replica

    async def acquire(self, tenant: str, tokens: int, holder: str, ticket: str = "") -> bool:
        """Admit (or raise RateLimited); False: the replica gave this ticket up first, nothing is held."""
        if self.cancelled.pop(ticket, 0) is None:
            return False
        try:
            self.tenants.acquire(tenant, tokens, holder)
        except RateLimited:  # holds of replicas that died mid-request must not block their tenant
            if not await self._forget_dead(tenant):
                raise
            self.tenants.acquire(tenant, tokens, holder)
        if ticket:
            if self.cancelled.pop(ticket, 0) is None:  # given up while this acquire waited above
                self.tenants.release(tenant, tokens, holder)
                return False
            self.admitted[ticket] = (tenant, tokens, holder)
        return True

    def release(self, tenant: str, unused_tokens: int, holder: str, ticket: str = "") -> None:
        if ticket and self.admitted.pop(ticket, None) is None:
            return  # given back by `cancel`, or from before a restart of this actor
        self.tenants.release(tenant, unused_tokens, holder)

    def cancel(self, ticket: str) -> None:
        """The replica stopped waiting for this ticket's acquire (it admitted the request by its own
        limits): what the acquire took is given back, or it takes nothing when it runs."""
        held = self.admitted.pop(ticket, None)
        if held is not None:
            self.tenants.release(*held)
            return
        self.cancelled[ticket] = None
        while len(self.cancelled) > CANCELLED_KEPT:
            self.cancelled.popitem(last=False)

    async def _forget_dead(self, tenant: str) -> int:
        freed = 0
        for holder in self.tenants.holders(tenant):
            replica = self.replicas.get(holder)
            if replica is None:
                continue
            try:
                await asyncio.wait_for(replica.__ray_ready__.remote(), timeout=1.0)
            except ray.exceptions.RayActorError:
                freed += self.tenants.forget(holder)
                self.replicas.pop(holder, None)
                for ticket in [t for t, (_, _, h) in self.admitted.items() if h == holder]:
                    del self.admitted[ticket]
            except asyncio.TimeoutError:
                pass
        return freed
