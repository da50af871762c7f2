"""The tenants' admission state (requests in flight, token buckets), one named actor that every
Serve replica shares, so limits hold across replicas, replacements and autoscaling."""

import asyncio
from typing import Any

import ray

from expertmesh.platform.tenancy import RateLimited, Tenants, TenantsFile


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class TenantLimits:
    """The tenants' admission state (requests in flight, token buckets) every replica shares."""

    def __init__(self, tenants: dict | None) -> None:
        self.tenants = Tenants(TenantsFile.model_validate(tenants) if tenants else None)
        self.replicas: dict[str, Any] = {}  # holder id -> its replica's actor handle

    def update(self, tenants: dict | None, holder: str, replica: Any) -> None:
        self.tenants.update(TenantsFile.model_validate(tenants) if tenants else None)
        self.replicas[holder] = replica

    async def acquire(self, tenant: str, tokens: int, holder: str) -> None:
        try:
            self.tenants.acquire(tenant, tokens, holder)
        except RateLimited:  # holds of replicas that died mid-request must not block their tenant
            if not await self._forget_dead(tenant):
                raise
            self.tenants.acquire(tenant, tokens, holder)

    def release(self, tenant: str, unused_tokens: int, holder: str) -> None:
        self.tenants.release(tenant, unused_tokens, holder)

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
            except asyncio.TimeoutError:
                pass
        return freed
