"""Serving metrics through Ray's metrics system (exported by every Ray node's metrics agent)."""

from __future__ import annotations

from ray.util import metrics

from expertmesh.engine.request import Result

_BOUNDS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]


class ServeMetrics:
    def __init__(self) -> None:
        self.ttft = metrics.Histogram("expertmesh_time_to_first_token_seconds", "time to first token",
                                      boundaries=_BOUNDS_S, tag_keys=("tenant",))
        self.tpot = metrics.Histogram("expertmesh_time_per_output_token_seconds", "time per output token",
                                      boundaries=_BOUNDS_S, tag_keys=("tenant",))
        self.tokens_in = metrics.Counter("expertmesh_prompt_tokens_total", "prompt tokens", tag_keys=("tenant",))
        self.tokens_out = metrics.Counter("expertmesh_completion_tokens_total", "completion tokens",
                                          tag_keys=("tenant",))
        self.queue = metrics.Gauge("expertmesh_requests_in_flight", "requests admitted and not finished")
        self.expert_group_tokens = metrics.Counter("expertmesh_expert_group_tokens_total",
                                                   "tokens routed to each expert group", tag_keys=("group",))
        self.shard_visits = metrics.Histogram("expertmesh_shards_visited_per_request", "context shards visited",
                                              boundaries=[1, 2, 4, 8, 16, 32, 64])
        self.refused = metrics.Counter("expertmesh_requests_refused_total", "requests refused",
                                       tag_keys=("tenant", "status"))

    def record(self, tenant: str, result: Result) -> None:
        tags = {"tenant": tenant}
        if result.ttft_s is not None:
            self.ttft.observe(result.ttft_s, tags)
            n = result.completion_tokens
            if n > 1:
                self.tpot.observe((result.total_s - result.ttft_s) / (n - 1), tags)
        if result.prompt_tokens:
            self.tokens_in.inc(result.prompt_tokens, tags)
        if result.completion_tokens:
            self.tokens_out.inc(result.completion_tokens, tags)
        pathway = result.pathway
        for group, n in (pathway.get("expert_group_tokens") or {}).items():
            if n:
                self.expert_group_tokens.inc(n, {"group": str(group)})
        self.shard_visits.observe(len(pathway.get("shards") or []))

