"""The router's Ray metrics: its queue (requests waiting for their first step, requests running)
and how long its steps take, each series labelled with the router (its actor name), beside the
Serve replicas' metrics (platform/metrics.py) and the data plane's (dataplane/plane_metrics.py)."""

from __future__ import annotations

from ray.util import metrics

# one step of the mesh (all of a batch's layers): 1 ms .. 60 s, as platform/metrics.py's latencies
STEP_BOUNDS_S = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60]


class StepMetrics:
    def __init__(self, router: str) -> None:
        self.tags = {"router": router}
        self.waiting = metrics.Gauge("expertmesh_router_requests_waiting",
                                     "requests at the router waiting for their first step", tag_keys=("router",))
        self.running = metrics.Gauge("expertmesh_router_requests_running",
                                     "requests at the router being decoded (in or between steps)",
                                     tag_keys=("router",))
        self.step = metrics.Histogram("expertmesh_router_step_seconds", "one step of the router (seconds)",
                                      boundaries=STEP_BOUNDS_S, tag_keys=("router",))
        self.last: tuple[int, int] | None = None

    def queue(self, waiting: int, running: int) -> None:
        if (waiting, running) != self.last:  # the gauge keeps its value: set it only when it changes
            self.waiting.set(waiting, self.tags)
            self.running.set(running, self.tags)
            self.last = (waiting, running)

    def stepped(self, seconds: float) -> None:
        self.step.observe(seconds, self.tags)
