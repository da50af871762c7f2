"""Serving metrics through Ray's metrics system (exported by every Ray node's metrics agent, on its
metrics export port, in Prometheus' text format with Ray's `ray_` prefix: a Counter named
`expertmesh_prompt_tokens_total` is scraped as `ray_expertmesh_prompt_tokens_total`).

Recorded by each Serve replica: per tenant, the requests that finished, their tokens, time to
first token and inter-token latency; the requests in flight; refusals by reason; the tokens each
expert group took; the context shards each request visited; requests that failed over. The router's queue and step times
are actors/router/router_metrics.py's, the data plane's dataplane/plane_metrics.py's. The Grafana
dashboard over all of them is platform/dashboard.py's (docs/observability.md)."""

from __future__ import annotations

from collections.abc import Sequence

from ray.util import metrics

from expertmesh.actors.router.router_metrics import start_at_zero
from expertmesh.engine.request import Result

# latencies of LLM serving, 1 ms .. 60 s (time to first token, inter-token latency, a router step)
LATENCY_BOUNDS_S = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60]
# context shards visited by a request: the first bucket (le 0.5) holds requests without a context
SHARD_BOUNDS = [0.5, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128]


class ServeMetrics:
    def __init__(self, tenants: Sequence[str] = ()) -> None:
        """tenants: those whose rare events (failovers) are counted from 0 (router_metrics.start_at_zero)."""
        self.requests = metrics.Counter("expertmesh_requests_total",
                                        "requests finished (one per prompt and choice), by finish reason",
                                        tag_keys=("tenant", "finish_reason"))
        self.ttft = metrics.Histogram("expertmesh_time_to_first_token_seconds",
                                      "time to first token (seconds, from arrival at the router)",
                                      boundaries=LATENCY_BOUNDS_S, tag_keys=("tenant",))
        self.tpot = metrics.Histogram("expertmesh_time_per_output_token_seconds",
                                      "time per output token after the first (seconds, one observation a request)",
                                      boundaries=LATENCY_BOUNDS_S, tag_keys=("tenant",))
        self.itl = metrics.Histogram("expertmesh_inter_token_latency_seconds",
                                     "time between tokens as the Serve replica receives them (seconds, one "
                                     "observation a token; k tokens arriving together after t: k of t/k)",
                                     boundaries=LATENCY_BOUNDS_S, tag_keys=("tenant",))
        self.tokens_in = metrics.Counter("expertmesh_prompt_tokens_total", "prompt tokens", tag_keys=("tenant",))
        self.tokens_out = metrics.Counter("expertmesh_completion_tokens_total", "completion tokens",
                                          tag_keys=("tenant",))
        self.queue = metrics.Gauge("expertmesh_requests_in_flight",
                                   "requests admitted and not finished (a Serve replica's queue)")
        self.expert_group_tokens = metrics.Counter("expertmesh_expert_group_tokens_total",
                                                   "tokens routed to each expert group", tag_keys=("group",))
        self.shard_visits = metrics.Histogram("expertmesh_shards_visited_per_request",
                                              "context shards a request visited (0: no context)",
                                              boundaries=SHARD_BOUNDS)
        self.shard_requests = metrics.Counter("expertmesh_context_shard_requests_total",
                                              "requests that visited each context shard", tag_keys=("shard",))
        # reason: queue_full (503, the replica's queue), concurrency / token_rate (429, the tenant's limits)
        self.refused = metrics.Counter("expertmesh_requests_refused_total", "requests refused at admission",
                                       tag_keys=("tenant", "status", "reason"))
        self.failovers = metrics.Counter("expertmesh_request_failovers_total",
                                         "requests run again (on another router, or theirs restarted) after their "
                                         "router died under them, each going on from the tokens already sent",
                                         tag_keys=("tenant",))
        for tenant in tenants:
            start_at_zero(self.failovers, {"tenant": tenant})

    def failover(self, tenant: str) -> None:
        self.failovers.inc(1, {"tenant": tenant})

    def record(self, tenant: str, result: Result, token_gaps: Sequence[float] = ()) -> None:
        """A finished request; `token_gaps`: seconds between its tokens as they reached the replica."""
        tags = {"tenant": tenant}
        self.requests.inc(1, {"tenant": tenant, "finish_reason": result.finish_reason or "none"})
        if result.ttft_s is not None:
            self.ttft.observe(result.ttft_s, tags)
            n = result.completion_tokens
            if n > 1:
                self.tpot.observe((result.total_s - result.ttft_s) / (n - 1), tags)
        for gap in token_gaps:
            self.itl.observe(gap, tags)
        if result.prompt_tokens:
            self.tokens_in.inc(result.prompt_tokens, tags)
        if result.completion_tokens:
            self.tokens_out.inc(result.completion_tokens, tags)
        pathway = result.pathway
        for group, n in (pathway.get("expert_group_tokens") or {}).items():
            if n:
                self.expert_group_tokens.inc(n, {"group": str(group)})
        shards = pathway.get("shards") or []
        self.shard_visits.observe(len(shards))
        for shard in shards:
            self.shard_requests.inc(1, {"shard": str(shard)})
