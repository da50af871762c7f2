"""The pool's changes over Serve's HTTP API, a part of the Serve deployment (serve.py): what
`expertmesh pool` does from a shell on the cluster, for tenants the tenants file marks `admin`.
POST /v1/pool/{action} with a JSON body (`PoolChange`): add-shards and add-groups (`count`),
remove-shards and remove-groups (`indices`), rebalance, balance-experts (`redundant`: extra copies
of hot experts per MoE layer). The mesh serves on while it changes; one change at a time per
replica, each bounded (POOL_TIMEOUT_S)."""

import asyncio

from pydantic import BaseModel, ConfigDict, Field

from expertmesh.pipelines.api_errors import ApiError, api_error

ACTIONS = ("add-shards", "remove-shards", "rebalance", "add-groups", "remove-groups", "balance-experts")
POOL_TIMEOUT_S = 300.0  # starting actors, moving segments and experts


class PoolChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: int = Field(1, ge=1, le=64, description="add-shards, add-groups: how many")
    indices: list[int] = Field(default_factory=list, max_length=64,
                               description="remove-shards, remove-groups: which (GET /v1/pool lists them)")
    redundant: int = Field(0, ge=0, le=4096, description="add-groups, remove-groups, balance-experts: extra "
                                                         "copies of the hottest experts per MoE layer")


SUMMARY = "change the pool (admin tenants): " + ", ".join(ACTIONS)


class PoolChanges:
    """Mixed into ExpertMeshServer (its tenants and mesh; its route POST /v1/pool/{action} calls
    `_change_pool`)."""

    _pool_lock: asyncio.Lock | None = None

    async def _change_pool(self, tenant: str, action: str, body: PoolChange | None) -> dict:
        """Run one change of the pool while the mesh serves; answer what it did (indices added,
        what moved, balancedness per layer)."""
        if not self.tenants.is_admin(tenant):
            raise ApiError(403, f"tenant {tenant!r} may not change the pool; the tenants file marks the tenants "
                           "that may (admin: true)", "permission_error", code="not_admin")
        if action not in ACTIONS:
            raise ApiError(404, f"no pool action {action!r}; the actions are {', '.join(ACTIONS)}", param="action",
                           code="unknown_action")
        body = body or PoolChange()
        if action.startswith("remove-") and not body.indices:
            raise ApiError(400, f"{action} needs `indices`: which to take out (GET /v1/pool lists the shards and "
                           "groups)", param="indices")
        if self._pool_lock is None:
            self._pool_lock = asyncio.Lock()
        async with self._pool_lock:
            try:
                return {"action": action, "result": await asyncio.to_thread(self._run_change, action, body)}
            except ApiError:
                raise
            except Exception as exc:  # noqa: BLE001 - mapped, or re-raised as the bug it is
                mapped = api_error(exc)
                if mapped is None:
                    raise
                raise mapped from None

    def _run_change(self, action: str, body: PoolChange):
        mesh, t = self.mesh, POOL_TIMEOUT_S
        if action == "add-shards":
            return {"added": mesh.add_shards(body.count, timeout_s=t)}
        if action == "remove-shards":
            return mesh.remove_shards(body.indices, timeout_s=t)
        if action == "rebalance":
            return mesh.rebalance()
        if action == "add-groups":
            return mesh.add_groups(body.count, redundant=body.redundant, timeout_s=t)
        if action == "remove-groups":
            return mesh.remove_groups(body.indices, redundant=body.redundant, timeout_s=t)
        return mesh.balance_experts(redundant=body.redundant, timeout_s=t)
