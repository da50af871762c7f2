"""The recent requests a Serve replica answered, per tenant, with their pathways: what the
pathway page shows a tenant (its own requests only)."""

from __future__ import annotations

import collections
import time
from typing import Any

KEEP = 64  # requests remembered per tenant


class RecentRequests:
    def __init__(self, keep: int = KEEP) -> None:
        self._by_tenant: dict[str, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=keep))

    def record(self, tenant: str, result: Any) -> None:
        """A finished request (engine.request.Result)."""
        self._by_tenant[tenant].append({
            "id": result.request_id, "created": time.time(), "context_id": result.pathway.get("context_id"),
            "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "context_tokens": result.context_tokens, "finish_reason": result.finish_reason,
            "ttft_s": result.ttft_s, "total_s": result.total_s, "pathway": result.pathway})

    def of(self, tenant: str, limit: int = KEEP) -> list[dict]:
        """The tenant's requests, newest first."""
        return list(reversed(self._by_tenant.get(tenant, ())))[:limit]
