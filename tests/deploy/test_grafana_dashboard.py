"""The Grafana dashboard as shipped: the committed JSON (deploy/grafana/, and the chart's copy) is what
`expertmesh dashboard` generates; its panels read only metrics the code records, under the names
Ray exports; every query is valid PromQL (promtool). tests/e2e/test_dashboard.py evaluates them on a
real Prometheus scraping a running mesh."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from expertmesh.platform import dashboard

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "deploy" / "grafana" / "expertmesh-dashboard.json"
IN_CHART = ROOT / "helm" / "expertmesh" / "dashboards" / "expertmesh.json"
DOC = ROOT / "docs" / "observability.md"
# Ray Serve's own metrics that panels read (their names checked on a real scrape by the e2e test)
RAY_SERVE = {"serve_num_http_requests_total": "Counter", "serve_http_request_latency_ms": "Histogram"}


def test_committed_dashboard_is_the_generated_one():
    """To update: `expertmesh dashboard --out deploy/grafana/expertmesh-dashboard.json` and
    `--out helm/expertmesh/dashboards/expertmesh.json`."""
    assert COMMITTED.read_text() == dashboard.render()
    assert IN_CHART.read_text() == dashboard.render()


def test_the_cli_writes_it(tmp_path, capsys):
    from expertmesh.cli.commands import main

    assert main(["dashboard", "--out", str(tmp_path / "d" / "dash.json")]) == 0
    assert (tmp_path / "d" / "dash.json").read_text() == COMMITTED.read_text()
    assert main(["dashboard", "--queries"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [tuple(line.split("\t")) for line in lines] == dashboard.queries(dashboard.dashboard())


def recorded_metrics() -> dict[str, str]:
    """Every metric the package records through `ray.util.metrics`: name -> Counter/Gauge/Histogram."""
    found = {}
    for path in (ROOT / "expertmesh").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in {"Counter", "Gauge", "Histogram"}
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "metrics"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                found[node.args[0].value] = node.func.attr
    return found


def test_panels_read_only_metrics_the_code_records():
    recorded = recorded_metrics()
    assert len(recorded) >= 15, recorded
    for name, kind in recorded.items():  # Prometheus' conventions: counters end in _total, units in the name
        assert name.startswith("expertmesh_"), name
        assert (kind == "Counter") == name.endswith("_total"), (name, kind)
    known = {**recorded, **RAY_SERVE}
    dash = dashboard.dashboard()
    exprs = [e for _, _, e in dashboard.queries(dash) + dashboard.annotation_queries(dash)]  # metric{matchers}
    exprs += [re.match(r"label_values\((\w+)", v["definition"]).group(1) + "{"  # a variable's metric
              for v in dash["templating"]["list"] if v["type"] == "query"]
    read = set()
    for expr in exprs:
        names = re.findall(r"\bray_([a-z_]+)\{", expr)
        assert names, expr
        for name in names:
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in known or known.get(base) == "Histogram", (name, expr)
            read.add(name if name in known else base)
    # the panels the operator asked for read what they should
    assert {"expertmesh_requests_total", "expertmesh_completion_tokens_total", "expertmesh_prompt_tokens_total",
            "expertmesh_time_to_first_token_seconds", "expertmesh_inter_token_latency_seconds",
            "expertmesh_requests_in_flight", "expertmesh_router_requests_waiting", "expertmesh_requests_refused_total",
            "expertmesh_expert_group_tokens_total", "expertmesh_shards_visited_per_request",
            "expertmesh_data_plane_refused_connections", "expertmesh_data_plane_groups_formed_total",
            "expertmesh_kv_pool_bytes", "expertmesh_kv_pool_capacity_bytes", "expertmesh_context_pages_read_total",
            "expertmesh_contexts", "expertmesh_context_shard_tokens", "expertmesh_expert_layer_tokens_total",
            "expertmesh_recoveries_total", "expertmesh_request_failovers_total"} <= read


def test_dashboard_structure():
    dash = dashboard.dashboard()
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["type"] == "timeseries" and p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert p["description"] and p["fieldConfig"]["defaults"]["unit"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(set(refs)) == len(refs) and all(t["datasource"] == p["datasource"] for t in p["targets"])
    names = [v["name"] for v in dash["templating"]["list"]]
    assert names == ["datasource", *dashboard.VARIABLES]
    for _, _, expr in dashboard.queries(dash):
        dashboard.expand(expr)  # every variable a query uses is defined (KeyError otherwise)
    with pytest.raises(KeyError):
        dashboard.expand('up{job="$nope"}')


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="no `promtool` (Debian's package `prometheus`: `make setup` installs it as root "
                           "through scripts/install-test-packages.sh)")
def test_every_query_is_valid_promql(tmp_path):
    """promtool parses each query (Grafana's variables expanded as Grafana does), as a recording rule."""
    def check(exprs: list[str]) -> subprocess.CompletedProcess:
        rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query_{i}", "expr": e}
                                                            for i, e in enumerate(exprs)]}]}
        (tmp_path / "rules.yml").write_text(json.dumps(rules))
        return subprocess.run(["promtool", "check", "rules", str(tmp_path / "rules.yml")],
                              capture_output=True, text=True, timeout=60, check=False)

    dash = dashboard.dashboard()
    exprs = [dashboard.expand(e) for _, _, e in dashboard.queries(dash) + dashboard.annotation_queries(dash)]
    assert len(dashboard.annotation_queries(dash)) == len(dashboard.ANNOTATIONS) == 1
    done = check(exprs)
    assert done.returncode == 0 and f"{len(exprs)} rules found" in done.stdout, done.stdout + done.stderr
    assert check(["sum by (tenant) (rate(x[1m])"]).returncode != 0  # not vacuous: a parse error fails


def test_docs_list_every_panel_and_query():
    """docs/observability.md holds dashboard.markdown() (the panels' table) as generated."""
    assert dashboard.markdown() in DOC.read_text()


def test_readme_names_every_panel_with_its_queries():
    """README.md holds dashboard.readme_table() (one row per panel, its queries) as generated."""
    readme = (ROOT / "README.md").read_text()
    assert dashboard.readme_table() in readme
    assert all(f"| {p.title} |" in readme for _, panels in dashboard.ROWS for p in panels)
