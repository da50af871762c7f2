"""Tenants: API keys (stored as SHA-256 only), concurrency, token-rate and context quotas.

Ray Serve has no authentication, quotas or per-tenant isolation of its own; this module is
where a request is tied to a tenant and admitted or refused before it reaches the router.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import threading
import time
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

ANONYMOUS = "anonymous"


class TenantSpec(BaseModel):
    """One tenant of the tenants file."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="tenant name, shown as the owner of its contexts", min_length=1, max_length=64)
    api_key_sha256: str = Field(description="hex SHA-256 of the tenant's API key (the key itself is never stored)")
    max_concurrent_requests: int = Field(8, ge=1, description="requests in flight at once; more get 429")
    tokens_per_minute: int = Field(200_000, ge=1, description="prompt + completion tokens per minute; more get 429")
    max_context_tokens: int = Field(2_000_000, ge=0, description="total tokens of the contexts this tenant owns")
    admin: bool = Field(False, description="may change the pool over the API (POST /v1/pool/{action}: add and take "
                                          "out context shards and expert groups, rebalance, balance experts)")

    @field_validator("api_key_sha256")
    @classmethod
    def _hex64(cls, v: str) -> str:
        v = v.strip().lower()
        if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
            raise ValueError("api_key_sha256 must be 64 hex characters (sha256 of the key)")
        return v


class TenantsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenants: list[TenantSpec] = Field(description="the tenants allowed to use this server")

    @field_validator("tenants")
    @classmethod
    def _unique(cls, v: list[TenantSpec]) -> list[TenantSpec]:
        names = [t.name for t in v]
        if len(set(names)) != len(names):
            raise ValueError(f"tenant names must be unique, got {names}")
        return v


def load_tenants(path: str | Path) -> TenantsFile:
    return TenantsFile.model_validate(yaml.safe_load(Path(path).read_text()) or {})


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class RateLimited(Exception):
    """A tenant over its concurrency or token rate (HTTP 429). `reason`: "concurrency" or
    "token_rate" (the refusal counter's label); kept in args, so it survives Ray's pickling."""

    def __init__(self, message: str, reason: str = "token_rate") -> None:
        super().__init__(message, reason)

    def __str__(self) -> str:
        return str(self.args[0])

    @property
    def reason(self) -> str:
        return self.args[1] if len(self.args) > 1 else "token_rate"


@dataclasses.dataclass
class _State:
    spec: TenantSpec
    in_flight: int = 0
    tokens: float = 0.0  # token bucket: refills at tokens_per_minute / 60 per second
    stamp: float = dataclasses.field(default_factory=time.monotonic)


class Tenants:
    """Authentication and admission. Thread-safe.

    Every server replica authenticates with its own instance; admission state (requests in
    flight, token buckets) lives in one instance that all replicas share (the serving app's
    named `TenantLimits` actor), so the limits hold across replicas. A hold is taken by a
    `holder` (a replica) and released by it; `forget(holder)` frees the holds of a replica that
    died with requests in flight.
    """

    def __init__(self, spec: TenantsFile | None) -> None:
        self._lock = threading.Lock()
        self._state: dict[str, _State] = {}
        self._holds: dict[tuple[str, str], int] = {}  # (holder, tenant) -> requests in flight
        self.update(spec)

    def update(self, spec: TenantsFile | None) -> None:
        """Take a new tenants file (a redeploy); tenants kept keep their requests in flight."""
        specs = spec.tenants if spec else [TenantSpec(name=ANONYMOUS, api_key_sha256="0" * 64,
                                                      max_concurrent_requests=64, tokens_per_minute=10**9,
                                                      max_context_tokens=10**9)]
        with self._lock:
            self.open = spec is None  # no tenants file: one anonymous tenant, no keys (loopback only)
            self._by_hash = {s.api_key_sha256: s.name for s in specs}
            old = self._state
            self._state = {s.name: _State(s, tokens=float(s.tokens_per_minute)) for s in specs}
            for name, st in self._state.items():
                if name in old:
                    st.in_flight, st.tokens = old[name].in_flight, min(old[name].tokens, st.tokens)

    def authenticate(self, authorization: str | None) -> str | None:
        """Tenant name for an `Authorization: Bearer KEY` header, or None."""
        if self.open:
            return ANONYMOUS
        if not authorization or not authorization.lower().startswith("bearer "):
            return None
        digest = hash_key(authorization[7:].strip())
        for known, name in self._by_hash.items():
            if hmac.compare_digest(known, digest):
                return name
        return None

    def spec(self, tenant: str) -> TenantSpec:
        return self._state[tenant].spec

    def is_admin(self, tenant: str) -> bool:
        """May this tenant change the pool? Without a tenants file (loopback only) the one tenant may."""
        return self.open or self._state[tenant].spec.admin

    def acquire(self, tenant: str, tokens: int, holder: str = "") -> None:
        """Admit a request of about `tokens` tokens, or raise RateLimited (the caller must release)."""
        with self._lock:
            st = self._state[tenant]
            now = time.monotonic()
            rate = st.spec.tokens_per_minute / 60.0
            st.tokens = min(float(st.spec.tokens_per_minute), st.tokens + (now - st.stamp) * rate)
            st.stamp = now
            if st.in_flight >= st.spec.max_concurrent_requests:
                raise RateLimited(f"tenant {tenant!r} has {st.in_flight} requests in flight; "
                                  f"max_concurrent_requests is {st.spec.max_concurrent_requests}", "concurrency")
            if tokens > st.tokens:
                wait = (tokens - st.tokens) / rate
                raise RateLimited(f"tenant {tenant!r} is over its token rate ({st.spec.tokens_per_minute} "
                                  f"tokens per minute); retry in {wait:.1f}s", "token_rate")
            st.tokens -= tokens
            st.in_flight += 1
            self._holds[holder, tenant] = self._holds.get((holder, tenant), 0) + 1

    def release(self, tenant: str, unused_tokens: int = 0, holder: str = "") -> None:
        with self._lock:
            st = self._state.get(tenant)
            if st is None or self._holds.get((holder, tenant), 0) == 0:
                return  # forgotten (its holder was declared dead) or from before a redeploy
            self._holds[holder, tenant] -= 1
            st.in_flight = max(0, st.in_flight - 1)
            st.tokens = min(float(st.spec.tokens_per_minute), st.tokens + max(0, unused_tokens))

    def holders(self, tenant: str) -> list[str]:
        """Holders with requests of this tenant in flight."""
        with self._lock:
            return [h for (h, t), n in self._holds.items() if t == tenant and n]

    def forget(self, holder: str) -> int:
        """Release every hold of a holder that died; return how many."""
        with self._lock:
            freed = 0
            for (h, t), n in list(self._holds.items()):
                if h == holder:
                    del self._holds[h, t]
                    if t in self._state:
                        self._state[t].in_flight = max(0, self._state[t].in_flight - n)
                    freed += n
            return freed

    def in_flight(self) -> dict[str, int]:
        with self._lock:
            return {n: s.in_flight for n, s in self._state.items()}
