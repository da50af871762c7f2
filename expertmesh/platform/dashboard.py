"""The Grafana dashboard over expertmesh's Ray metrics, built as plain JSON (no Ray, no Grafana
library): `expertmesh dashboard --out FILE` writes it; the repository ships it as
deploy/grafana/expertmesh-dashboard.json and in the Helm chart (helm/expertmesh/dashboards/), both
checked against this module by the tests, and every query is evaluated on a real Prometheus
scraping a running mesh (tests/e2e/test_dashboard.py).

The queries read the names as Ray's metrics agent exports them: the name given to
`ray.util.metrics` with Ray's `ray_` prefix (a Counter's name ends in `_total`; a Histogram adds
`_bucket`, `_sum`, `_count`); two panels read Ray Serve's own HTTP metrics. Every series also
carries Ray's own labels (`WorkerId`, `NodeAddress`, `SessionName`, ...): one series per process,
hence the `sum by (...)` everywhere.
The chart's PodMonitor adds `ray_io_cluster` (KubeRay's `ray.io/cluster` pod label), the
dashboard's `cluster` variable; without it (a Prometheus scraping Ray nodes directly) the
variable's "All" (`.*`) matches the missing label.

Variables: `datasource` (a Prometheus data source), `cluster` (`ray_io_cluster`), `tenant`.
"""

from __future__ import annotations

import dataclasses
import json
import re

PREFIX = "ray_"  # Ray's metrics agent prefixes every metric's name with its namespace
UID = "expertmesh-overview"
TITLE = "expertmesh"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
VARIABLES = ("cluster", "tenant")  # query variables; "All" is ".*"


def metric(name: str) -> str:
    """The exported name of a metric recorded through Ray (expertmesh's, or Ray Serve's own)."""
    return PREFIX + name


@dataclasses.dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclasses.dataclass(frozen=True)
class Panel:
    title: str
    description: str
    unit: str
    queries: tuple[Query, ...]
    stack: bool = False


# label matchers: the cluster variable on every query, the tenant variable where the metric has one
C = 'ray_io_cluster=~"$cluster"'
CT = f'{C}, tenant=~"$tenant"'
W = "[$__rate_interval]"


def _rate(name: str, by: str, sel: str = C) -> str:
    return f"sum by ({by}) (rate({metric(name)}{{{sel}}}{W}))"


def _quantile(q: float, name: str, by: str = "le", sel: str = CT) -> str:
    return f"histogram_quantile({q:g}, sum by ({by}) (rate({metric(name)}_bucket{{{sel}}}{W})))"


def _mean(name: str, sel: str = C) -> str:
    return (f"sum(rate({metric(name)}_sum{{{sel}}}{W})) / "
            f"sum(rate({metric(name)}_count{{{sel}}}{W}))")


def _recoveries(window: str, tenant_sel: str) -> str:
    """Recoveries by kind in the window: the routers' (expertmesh_recoveries_total) and the Serve
    replicas' request failovers (kind request_failover), one series each."""
    failovers = f"sum(increase({metric('expertmesh_request_failovers_total')}{{{tenant_sel}}}{window}))"
    return (f"sum by (kind) (increase({metric('expertmesh_recoveries_total')}{{{C}}}{window})) or "
            f'label_replace({failovers}, "kind", "request_failover", "", "")')


def _balance() -> str:
    """Per router and MoE layer: the busiest expert group's load over the mean group's."""
    load = _rate("expertmesh_expert_layer_tokens_total", "router, layer, group")
    return f"max by (router, layer) ({load}) / avg by (router, layer) ({load})"


ROWS: tuple[tuple[str, tuple[Panel, ...]], ...] = (
    ("Traffic", (
        Panel("Requests per second, by tenant",
              "Requests finished per second (one per prompt and choice), from the Serve replicas "
              "(expertmesh_requests_total). Refused requests are under Admission.",
              "reqps", (Query(_rate("expertmesh_requests_total", "tenant", CT), "{{tenant}}"),)),
        Panel("Tokens per second, by tenant",
              "Completion and prompt tokens of finished requests per second "
              "(expertmesh_completion_tokens_total, expertmesh_prompt_tokens_total).",
              "suffix: tok/s", (
                  Query(_rate("expertmesh_completion_tokens_total", "tenant", CT), "{{tenant}} completion"),
                  Query(_rate("expertmesh_prompt_tokens_total", "tenant", CT), "{{tenant}} prompt"))),
        Panel("HTTP responses per second, by route and status",
              "Every HTTP response of the Serve proxy, errors included (Ray Serve's own "
              "serve_num_http_requests_total): 429 / 503 are refusals, 5xx failures.",
              "reqps", (Query(_rate("serve_num_http_requests_total", "route, status_code"),
                              "{{route}} {{status_code}}"),)),
        Panel("HTTP request latency (p50, p99), whole request",
              "From the Serve proxy's receiving a request to its last byte, streams included (Ray Serve's "
              "own serve_http_request_latency_ms, in milliseconds).",
              "ms", (Query(_quantile(0.5, "serve_http_request_latency_ms", sel=C), "p50"),
                     Query(_quantile(0.99, "serve_http_request_latency_ms", sel=C), "p99"))),
    )),
    ("Latency", (
        Panel("Time to first token (p50, p99)",
              "From a request's arrival at the router to its first token "
              "(expertmesh_time_to_first_token_seconds, buckets 1 ms .. 60 s).",
              "s", (Query(_quantile(0.5, "expertmesh_time_to_first_token_seconds"), "p50"),
                    Query(_quantile(0.99, "expertmesh_time_to_first_token_seconds"), "p99"))),
        Panel("Inter-token latency (p50, p99)",
              "Time between tokens as the Serve replica receives them, one observation a token "
              "(expertmesh_inter_token_latency_seconds); the mean is the per-request time per output "
              "token (expertmesh_time_per_output_token_seconds).",
              "s", (Query(_quantile(0.5, "expertmesh_inter_token_latency_seconds"), "p50"),
                    Query(_quantile(0.99, "expertmesh_inter_token_latency_seconds"), "p99"),
                    Query(_mean("expertmesh_time_per_output_token_seconds", CT), "mean per request"))),
        Panel("Time to first token p99, by tenant",
              "The p99 of each tenant's time to first token.",
              "s", (Query(_quantile(0.99, "expertmesh_time_to_first_token_seconds", "tenant, le"),
                          "{{tenant}}"),)),
        Panel("Router step time (p50, p99), by router",
              "One step of a router: every layer of a batch over the context shards and expert groups "
              "(expertmesh_router_step_seconds).",
              "s", (Query(_quantile(0.5, "expertmesh_router_step_seconds", "router, le", C), "{{router}} p50"),
                    Query(_quantile(0.99, "expertmesh_router_step_seconds", "router, le", C), "{{router}} p99"))),
    )),
    ("Admission", (
        Panel("Queue: requests in flight, waiting, running",
              "Requests admitted and not finished at the Serve replicas (expertmesh_requests_in_flight, "
              "all replicas); at each router, those waiting for their first step and those being "
              "decoded (expertmesh_router_requests_waiting / _running).",
              "short", (Query(f"sum({metric('expertmesh_requests_in_flight')}{{{C}}})", "in flight (Serve)"),
                        Query(f"sum by (router) ({metric('expertmesh_router_requests_waiting')}{{{C}}})",
                              "waiting at {{router}}"),
                        Query(f"sum by (router) ({metric('expertmesh_router_requests_running')}{{{C}}})",
                              "running at {{router}}"))),
        Panel("Refusals per second, by reason",
              "Requests refused at admission (expertmesh_requests_refused_total): queue_full (503, a "
              "replica's queue), concurrency and token_rate (429, the tenant's limits).",
              "reqps", (Query(_rate("expertmesh_requests_refused_total", "reason, status", CT),
                              "{{reason}} ({{status}})"),)),
    )),
    ("Mesh", (
        Panel("Expert-group token share",
              "Each expert group's share of the tokens routed to experts (expertmesh_expert_group_tokens_total): "
              "an even share is a balanced mesh.",
              "percentunit", (Query(f"{_rate('expertmesh_expert_group_tokens_total', 'group')} / ignoring (group) "
                                    f"group_left sum(rate({metric('expertmesh_expert_group_tokens_total')}{{{C}}}{W}))",
                                    "group {{group}}"),), stack=True),
        Panel("Context shards visited per request",
              "Shards a request attended over (expertmesh_shards_visited_per_request; 0 for a request "
              "without a context, fewer than all with top_shards).",
              "short", (Query(_quantile(0.5, "expertmesh_shards_visited_per_request", sel=C), "p50"),
                        Query(_quantile(0.99, "expertmesh_shards_visited_per_request", sel=C), "p99"),
                        Query(_mean("expertmesh_shards_visited_per_request"), "mean"))),
        Panel("Requests per second, by context shard",
              "Requests that visited each context shard (expertmesh_context_shard_requests_total): a hot "
              "shard stands out.",
              "reqps", (Query(_rate("expertmesh_context_shard_requests_total", "shard"), "shard {{shard}}"),)),
        Panel("Expert-group balancedness, by router",
              "Max over mean of the expert groups' load at each MoE layer (expertmesh_expert_layer_tokens_total): "
              "1 is even; the worst layer and the mean over layers. A group that took no token in the window "
              "is not in the mean.",
              "short", (Query(f"max by (router) ({_balance()})", "{{router}} worst layer"),
                        Query(f"avg by (router) ({_balance()})", "{{router}} mean over layers"))),
    )),
    ("KV pool", (
        Panel("KV cache held, by shard and tier",
              "The KV cache each context shard holds (expertmesh_kv_pool_bytes): tier memory is its hot pages "
              "in the page pool, tier store its segment files (the mesh's store, or its scratch directory "
              "without one); the dashed budget is the memory tier's (expertmesh_kv_pool_capacity_bytes).",
              "bytes", (Query(f"sum by (mesh, shard, tier) ({metric('expertmesh_kv_pool_bytes')}{{{C}}})",
                              "{{mesh}} shard {{shard}} {{tier}}"),
                        Query(f"sum by (mesh, shard) ({metric('expertmesh_kv_pool_capacity_bytes')}{{{C}}})",
                              "{{mesh}} shard {{shard}} memory budget"))),
        Panel("Pages read per second, by tier",
              "KV pages the context shards' attention read (expertmesh_context_pages_read_total): from memory "
              "(the page pool) or from the store (a segment file: a cold or evicted page).",
              "short", (Query(_rate("expertmesh_context_pages_read_total", "tier"), "{{tier}}"),)),
        Panel("Contexts and their tokens",
              "Contexts registered in the pool (expertmesh_contexts, as the routers see it: the max over "
              "them) and the context tokens each shard holds (expertmesh_context_shard_tokens).",
              "short", (Query(f"max({metric('expertmesh_contexts')}{{{C}}})", "contexts"),
                        Query(f"sum by (mesh, shard) ({metric('expertmesh_context_shard_tokens')}{{{C}}})",
                              "{{mesh}} shard {{shard}} tokens"))),
    )),
    ("Recoveries", (
        Panel("Recoveries, by kind",
              "Recoveries in the window (also shown as annotations): a lost shard's segments or a lost "
              "group's experts served by another (shard_takeover, group_takeover) and handed back "
              "(shard_back, group_back), a step run again after an actor failed under it (step_retry), a "
              "context lost with a shard of a mesh without a store (context_lost), from the routers "
              "(expertmesh_recoveries_total); requests that went on elsewhere after their router died "
              "(expertmesh_request_failovers_total, from the Serve replicas).",
              "short", (Query(_recoveries(W, CT), "{{kind}}"),)),
    )),
    ("Data plane", (
        Panel("Data-plane connections refused, by reason",
              "Connections refused or ended since the router started (expertmesh_data_plane_refused_connections): "
              "handshake (not the mesh's actor, or stalled) or malformed. Alert when it rises.",
              "short", (Query(f"sum by (router, reason) ({metric('expertmesh_data_plane_refused_connections')}{{{C}}})",
                              "{{router}} {{reason}}"),)),
        Panel("Data-plane groups formed",
              "Process groups formed by each router since it started (expertmesh_data_plane_groups_formed_total): "
              "a step up is a new group (an actor lost, back or added).",
              "short", (Query(f"sum by (router, transport) ({metric('expertmesh_data_plane_groups_formed_total')}"
                              f"{{{C}}})", "{{router}} ({{transport}})"),)),
    )),
)


# recoveries as events on every panel's time axis: (name, title, PromQL)
ANNOTATIONS = (("Recoveries", "{{kind}}", f"({_recoveries('[1m]', C)}) > 0"),)


def _timeseries(panel: Panel, pid: int, x: int, y: int) -> dict:
    custom = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never", "spanNulls": False}
    if panel.stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    return {
        "id": pid, "type": "timeseries", "title": panel.title, "description": panel.description,
        "datasource": DATASOURCE, "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit, "min": 0, "custom": custom}, "overrides": []},
        "options": {"legend": {"calcs": [], "displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "editorMode": "code", "range": True,
                     "expr": q.expr, "legendFormat": q.legend} for i, q in enumerate(panel.queries)],
    }


def _variable(name: str, label: str, query: str) -> dict:
    return {"name": name, "label": label, "type": "query", "datasource": DATASOURCE,
            "query": {"query": query, "refId": f"{name}-variable"}, "definition": query,
            "includeAll": True, "allValue": ".*", "multi": True, "refresh": 2, "sort": 1, "hide": 0,
            "regex": "", "options": [], "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}


def dashboard() -> dict:
    """The dashboard as Grafana's JSON model (schemaVersion 39: Grafana 10 and 11)."""
    panels, pid, y = [], 1, 0
    for title, row in ROWS:
        panels.append({"id": pid, "type": "row", "title": title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        pid, y = pid + 1, y + 1
        for i, panel in enumerate(row):
            panels.append(_timeseries(panel, pid, 12 * (i % 2), y + 8 * (i // 2)))
            pid += 1
        y += 8 * ((len(row) + 1) // 2)
    requests = metric("expertmesh_requests_total")
    return {
        "uid": UID, "title": TITLE,
        "description": "expertmesh: traffic and tokens per tenant, latency, admission, the mesh's shards and "
                       "expert groups, the data plane (Ray metrics; generated by `expertmesh dashboard`)",
        "tags": ["expertmesh", "ray", "llm"], "editable": True, "graphTooltip": 1, "timezone": "",
        "schemaVersion": 39, "version": 1, "refresh": "30s", "time": {"from": "now-1h", "to": "now"},
        "timepicker": {}, "fiscalYearStartMonth": 0, "liveNow": False, "weekStart": "", "links": [],
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"},
                                 *({"name": name, "datasource": DATASOURCE, "enable": True, "hide": False,
                                    "iconColor": "red", "expr": expr, "step": "30s", "titleFormat": title,
                                    "useValueForTime": False} for name, title, expr in ANNOTATIONS)]},
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
             "regex": "", "hide": 0, "includeAll": False, "multi": False, "refresh": 1, "options": [],
             "current": {}},
            _variable("cluster", "Ray cluster", f"label_values({requests}, ray_io_cluster)"),
            _variable("tenant", "Tenant", f"label_values({requests}{{{C}}}, tenant)"),
        ]},
        "panels": panels,
    }


def render() -> str:
    """The dashboard's JSON text, as committed (stable: same code, same bytes)."""
    return json.dumps(dashboard(), indent=2) + "\n"


def queries(dash: dict) -> list[tuple[str, str, str]]:
    """(panel title, legend, PromQL) of every query of a dashboard's JSON model."""
    return [(p["title"], t.get("legendFormat", ""), t["expr"])
            for p in dash["panels"] if p["type"] != "row" for t in p["targets"]]


def annotation_queries(dash: dict) -> list[tuple[str, str, str]]:
    """(name, title, PromQL) of every Prometheus annotation of a dashboard's JSON model."""
    return [(a["name"], a["titleFormat"], a["expr"]) for a in dash["annotations"]["list"] if "expr" in a]


def expand(expr: str, rate_interval: str = "1m", **values: str) -> str:
    """A query as Grafana sends it, outside Grafana: `$__rate_interval` -> `rate_interval`, each
    variable -> its value (default: "All", i.e. `.*`)."""
    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name == "__rate_interval":
            return rate_interval
        if name in VARIABLES:
            return values.get(name, ".*")
        raise KeyError(f"unknown dashboard variable ${name} in {expr!r}")

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, expr)


def short(expr: str) -> str:
    """A query as the README shows it: without the cluster and tenant matchers and Grafana's window."""
    expr = re.sub(r'\{ray_io_cluster=~"\$cluster"(, tenant=~"\$tenant")?\}', "", expr)
    expr = re.sub(r'\{ray_io_cluster=~"\$cluster", ', "{", expr)
    return expr.replace("[$__rate_interval]", "[5m]")


def readme_table() -> str:
    """One row per panel with its queries, short (README.md holds it)."""
    lines = ["| panel | queries |", "|---|---|"]
    for _, panels in ROWS:
        for panel in panels:
            lines.append(f"| {panel.title} | " + "<br>".join(f"`{short(q.expr)}`" for q in panel.queries) + " |")
    return "\n".join(lines) + "\n"


def markdown() -> str:
    """The panels and their queries as a Markdown table (docs/observability.md holds it)."""
    lines = ["| row | panel | legend | query |", "|---|---|---|---|"]
    for row, panels in ROWS:
        for panel in panels:
            for q in panel.queries:
                lines.append(f"| {row} | {panel.title} | `{q.legend}` | `{q.expr}` |")
    for name, title, expr in ANNOTATIONS:
        lines.append(f"| (annotation) | {name} | `{title}` | `{expr}` |")
    return "\n".join(lines) + "\n"
