"""The data plane's Ray metrics (exported by every Ray node's metrics agent, beside the
serving metrics of platform/metrics.py)."""

from __future__ import annotations

import time

from ray.util import metrics

METRICS_EVERY_S = 5.0  # the gauges are set again at a step at most this often


class DataPlaneMetrics:
    """The router's data plane: groups formed, and connections refused since the router started
    (a failed or stalled handshake: someone who is not the mesh's actor; or a connection ended
    for a malformed message). A gauge, exported from the first group on (0 until something is
    refused), so an alert on `> 0` or on its increase needs no first event. A refusal is
    something for an operator to look at."""

    def __init__(self, router: str = "") -> None:
        self.router = router  # which of the mesh's routers (its actor name): every series carries it
        self.at = 0.0  # when the gauges were last set (Ray drops a gauge not refreshed for 2 intervals)
        self.groups_formed = metrics.Counter("expertmesh_data_plane_groups_formed_total",
                                             "data-plane process groups formed", tag_keys=("router", "transport"))
        self.refused = metrics.Gauge("expertmesh_data_plane_refused_connections",
                                     "data-plane connections refused or ended since the router started",
                                     tag_keys=("router", "reason"))

    def record(self, transport: str, formed: bool, refused: int, malformed: int) -> None:
        if formed:
            self.groups_formed.inc(1, {"router": self.router, "transport": transport})
        self.refused.set(refused, {"router": self.router, "reason": "handshake"})
        self.refused.set(malformed, {"router": self.router, "reason": "malformed"})
        self.at = time.monotonic()

    def stale(self) -> bool:
        return time.monotonic() - self.at > METRICS_EVERY_S
