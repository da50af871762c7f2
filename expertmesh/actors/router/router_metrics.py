"""The router's Ray metrics, each series labelled with the router (its actor name): its queue
(requests waiting for their first step, requests running), how long its steps take, the tokens
routed to each expert group at each MoE layer (the load whose max/mean is the balancedness),
the contexts it sees and their tokens, and its recoveries by kind. Beside the Serve replicas'
metrics (platform/metrics.py), the context shards' (actors/shard_metrics.py) and the data
plane's (dataplane/plane_metrics.py).

Step figures are recorded as they happen; the load, contexts and recoveries at most every
`FLUSH_S` (what Ray's metrics agent exports no more often anyway): a 30-layer model's per-layer
counters would otherwise cost a step hundreds of calls."""

from __future__ import annotations

import time

import torch
from ray.util import metrics

from expertmesh.engine.engine import Recovery

# one step of the mesh (all of a batch's layers): 1 ms .. 60 s, as platform/metrics.py's latencies
STEP_BOUNDS_S = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60]
FLUSH_S = 2.0
RECOVERY_KINDS = ("shard_takeover", "shard_back", "group_takeover", "group_back", "step_retry", "context_lost")


def start_at_zero(counter: metrics.Counter, tags: dict[str, str]) -> None:
    """Make a counter's series exist at 0 before its first event: Prometheus' increase() of a
    series first seen at 1 is 0, so a rare event (a recovery) would never show. Ray's
    `Counter.inc` refuses 0; its `_record` is what `inc` calls."""
    record = getattr(counter, "_record", None)
    if record is not None:
        record(0, tags=tags)


class RouterMetrics:
    def __init__(self, router: str) -> None:
        self.tags = {"router": router}
        self.waiting = metrics.Gauge("expertmesh_router_requests_waiting",
                                     "requests at the router waiting for their first step", tag_keys=("router",))
        self.running = metrics.Gauge("expertmesh_router_requests_running",
                                     "requests at the router being decoded (in or between steps)",
                                     tag_keys=("router",))
        self.step = metrics.Histogram("expertmesh_router_step_seconds", "one step of the router (seconds)",
                                      boundaries=STEP_BOUNDS_S, tag_keys=("router",))
        self.layer_tokens = metrics.Counter("expertmesh_expert_layer_tokens_total",
                                            "(token, expert) pairs routed to each expert group at each MoE layer",
                                            tag_keys=("router", "layer", "group"))
        self.contexts = metrics.Gauge("expertmesh_contexts", "contexts registered in the pool, as the router sees it",
                                      tag_keys=("router",))
        self.context_tokens = metrics.Gauge("expertmesh_context_tokens", "tokens of the registered contexts",
                                            tag_keys=("router",))
        self.recoveries = metrics.Counter("expertmesh_recoveries_total",
                                          "recoveries: a lost shard's segments or a lost group's experts served "
                                          "elsewhere and handed back, a step run again, a context lost",
                                          tag_keys=("router", "kind"))
        for kind in RECOVERY_KINDS:
            start_at_zero(self.recoveries, {**self.tags, "kind": kind})
        self.last: tuple[int, int] | None = None
        self._sent: torch.Tensor | None = None  # the load already counted [layers, groups]
        self._flushed = 0.0

    def queue(self, waiting: int, running: int) -> None:
        if (waiting, running) != self.last:  # the gauge keeps its value: set it only when it changes
            self.waiting.set(waiting, self.tags)
            self.running.set(running, self.tags)
            self.last = (waiting, running)

    def stepped(self, seconds: float) -> None:
        self.step.observe(seconds, self.tags)

    def recovered(self, event: Recovery) -> None:
        self.recoveries.inc(1, {**self.tags, "kind": event.kind})

    def due(self) -> bool:
        return time.monotonic() - self._flushed >= FLUSH_S

    def flush(self, group_load: torch.Tensor, contexts: int, context_tokens: int) -> None:
        """The load routed since the last flush [layers, groups], and the contexts."""
        self._flushed = time.monotonic()
        if self._sent is not None and self._sent.shape != group_load.shape:  # expert groups added
            grown = torch.zeros_like(group_load)
            grown[:, :self._sent.shape[1]] = self._sent
            self._sent = grown
        delta = group_load if self._sent is None else group_load - self._sent
        self._sent = group_load.clone()
        for layer, group in delta.nonzero().tolist():
            self.layer_tokens.inc(int(delta[layer, group]), {**self.tags, "layer": str(layer), "group": str(group)})
        self.contexts.set(contexts, self.tags)
        self.context_tokens.set(context_tokens, self.tags)
