"""What a router reports of its own work beside its steps: the recoveries its engine and its
step loop made (counted as Ray metrics and listed, the latest 100), the expert load per MoE
layer with its balancedness, and the metrics it flushes every FLUSH_S (router_metrics.py)."""

from __future__ import annotations

import collections
import dataclasses
import logging

from expertmesh.actors.router.contexts import Contexts
from expertmesh.actors.router.router_metrics import RouterMetrics
from expertmesh.engine.engine import Engine, Recovery

log = logging.getLogger("expertmesh.router")


class Reports:
    def __init__(self, engine: Engine, contexts: Contexts, metrics: RouterMetrics | None) -> None:
        self.engine, self.contexts, self.metrics = engine, contexts, metrics
        self.recoveries: collections.deque[Recovery] = collections.deque(maxlen=100)

    def recovered(self, event: Recovery) -> None:
        self.engine.events.append(event)  # in the order they happened, with the engine's own

    def events(self) -> list[dict]:
        """The engine's new recoveries moved onto the router's list (and counted); the latest."""
        while self.engine.events:
            event = self.engine.events.popleft()
            self.recoveries.append(event)
            if self.metrics is not None:
                self.metrics.recovered(event)
        return [dataclasses.asdict(e) for e in self.recoveries]

    def observe(self, force: bool = False) -> None:
        """Recoveries counted now; the expert load and the contexts every FLUSH_S (or now). A
        report that fails is logged: it never stops the step loop."""
        try:
            self.events()
            self.engine.exchange.refresh_metrics()  # idle too: its gauges stay in the panels
            if self.metrics is not None and (force or self.metrics.due()):
                self.metrics.flush(self.engine.group_load(), len(self.contexts), sum(self.contexts.shard_tokens()))
        except Exception:  # noqa: BLE001 - the requests come first
            log.exception("the router's reports failed; serving on")

    def expert_load(self) -> dict:
        """Tokens routed to each expert group per MoE layer since the router started, and each
        layer's balancedness (max / mean group load; 1.0 is even) and experts' load [layer][expert]."""
        load = self.engine.group_load()
        layers = [i for i in range(load.shape[0]) if load[i].sum() > 0]
        kept = [g for g in range(load.shape[1]) if g not in self.engine.removed]  # groups taken out: not in the mean
        balance = {i: float(load[i, kept].max() / load[i, kept].float().mean()) for i in layers}
        return {"groups": {i: load[i].tolist() for i in layers}, "balancedness": balance,
                "max_balancedness": max(balance.values(), default=None),
                "experts": {i: self.engine.expert_load[i].tolist() for i in layers}}
