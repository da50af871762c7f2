"""The Grafana dashboard checked against the real thing: a real Prometheus (Debian's `prometheus`,
installed by `make setup` through scripts/install-test-packages.sh) scrapes the session's Ray
node's metrics endpoint every SCRAPE_S seconds while the e2e server (tests/e2e/conftest.py) takes load
from two tenants, and every panel's query of the committed dashboard is evaluated through
Prometheus' HTTP API: each answers, with data, and the figures agree with the load sent.

Ray's metrics agent exports what a process recorded every `metrics_report_interval_ms` (10 s
by default), so the load goes in two waves: the first makes every series exist in Prometheus,
the second makes the rates and quantiles over the dashboard's window non-zero.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import ray

import expertmesh as em
from expertmesh.dataplane.liveness import actor_info
from expertmesh.platform import dashboard
from tests.e2e.conftest import KEYS
from tests.e2e.serving import free_port

pytestmark = [pytest.mark.ray, pytest.mark.e2e,
              pytest.mark.skipif(shutil.which("prometheus") is None,
                                 reason="no `prometheus` binary: Debian's package `prometheus` (`make setup` installs "
                                        "it as root through scripts/install-test-packages.sh)")]

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "deploy" / "grafana" / "expertmesh-dashboard.json"
CONTEXT = "The grass is green. The sky is blue. The pass key is 4242. " * 76  # 4,484 tokens: 3 shards
WINDOW = "2m"  # $__rate_interval here: both waves and the samples before them
# Prometheus' scrape interval and timeout: the session's Ray node exports every mesh the session
# made; on the loaded machine an answer took over 1 s, the scrape failed and marked every series
# stale (a panel, or the load, "not in Prometheus")
SCRAPE_S = 3


def h(tenant: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


@pytest.fixture
def prometheus(ray_cluster, tmp_path):
    """A Prometheus on 127.0.0.1 scraping the Ray node's metrics port every SCRAPE_S seconds; killed at the end."""
    binary = shutil.which("prometheus")
    node = ray_cluster._private.worker.global_worker.node
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": f"{SCRAPE_S}s", "scrape_timeout": f"{SCRAPE_S}s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "ray", "static_configs": [
            {"targets": [f"127.0.0.1:{node.metrics_export_port}"]}]}]}))
    port = free_port()
    with open(tmp_path / "prometheus.log", "w") as log:
        proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h",
                                 "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"prometheus did not start: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def query(prom: str, expr: str) -> list[dict]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}: {r.text}"
    return body["data"]["result"]


def by(prom: str, expr: str, label: str) -> dict[str, float]:
    return {s["metric"].get(label, ""): float(s["value"][1]) for s in query(prom, expr)}


def settle(prom: str, since: float, interval_s: float, check, timeout_s: float = 60.0) -> dict:
    """Prometheus' totals once everything recorded before `since` is in them: after one of Ray's
    export intervals and two scrapes, and check(totals) holds (the waits of this test)."""
    deadline = time.time() + timeout_s
    while True:
        if time.time() >= since + interval_s + 2 * SCRAPE_S and check(t := totals(prom)):
            return t
        assert time.time() < deadline, f"the load is not in Prometheus within {timeout_s:g} s: {totals(prom)}"
        time.sleep(0.5)


def wave(server: str, context_id: str) -> dict:
    """Completions from acme (over its context; one streamed) and globex, and a request from tiny
    refused for its token rate (700 prompt tokens over a bucket of 600: refused whatever the bucket
    holds, and nothing taken from it). What was sent, per tenant."""
    sent = {t: {"requests": 0, "prompt": 0, "completion": 0} for t in ("acme", "globex")}
    shards = expert_tokens = 0
    for tenant, extra in (("acme", {"context_id": context_id}), ("acme", {"context_id": context_id}),
                          ("globex", {}), ("globex", {})):
        r = httpx.post(f"{server}/v1/completions", headers=h(tenant), timeout=120,
                       json={"model": "expertmesh", "prompt": " The pass key is", "max_tokens": 8,
                             "temperature": 0, **extra})
        assert r.status_code == 200, r.text
        body = r.json()
        sent[tenant]["requests"] += 1
        sent[tenant]["prompt"] += body["usage"]["prompt_tokens"]
        sent[tenant]["completion"] += body["usage"]["completion_tokens"]
        shards += len(body["pathway"]["shards"])
        expert_tokens += sum(body["pathway"]["expert_group_tokens"].values())
    with httpx.stream("POST", f"{server}/v1/completions", headers=h("acme"), timeout=120,
                      json={"model": "expertmesh", "prompt": " The sky is", "max_tokens": 8, "temperature": 0,
                            "stream": True, "stream_options": {"include_usage": True},
                            "context_id": context_id}) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    usage = chunks[-1]["usage"]
    sent["acme"]["requests"] += 1
    sent["acme"]["prompt"] += usage["prompt_tokens"]
    sent["acme"]["completion"] += usage["completion_tokens"]
    r = httpx.post(f"{server}/v1/completions", headers=h("tiny"), timeout=60,
                   json={"model": "expertmesh", "prompt": "y" * 700, "max_tokens": 1})
    assert r.status_code == 429 and "token rate" in r.json()["error"]["message"], r.text
    return {"tenants": sent, "shards": shards, "expert_tokens": expert_tokens}


def totals(prom: str) -> dict:
    m = dashboard.metric
    return {
        "requests": by(prom, f"sum by (tenant) ({m('expertmesh_requests_total')})", "tenant"),
        "prompt": by(prom, f"sum by (tenant) ({m('expertmesh_prompt_tokens_total')})", "tenant"),
        "completion": by(prom, f"sum by (tenant) ({m('expertmesh_completion_tokens_total')})", "tenant"),
        "ttft": by(prom, f"sum by (tenant) ({m('expertmesh_time_to_first_token_seconds')}_count)", "tenant"),
        "refused": by(prom, f"sum by (tenant) ({m('expertmesh_requests_refused_total')}"
                            '{reason="token_rate"})', "tenant"),
        "shards": by(prom, f"sum({m('expertmesh_shards_visited_per_request')}_sum)", "").get("", 0.0),
        "expert": by(prom, f"sum({m('expertmesh_expert_group_tokens_total')})", "").get("", 0.0),
    }


@pytest.fixture
def recovered(ray_cluster, prometheus, tiny_checkpoint):
    """A small mesh on the session's cluster whose expert group 1 is killed between two requests
    (Ray restarts it) once Prometheus has its router's recovery counters at 0: the router
    recovers (a step retried, group 0 holding the lost group's experts), the dashboard's
    recoveries. Yields the events the router listed; the mesh lives until the test ends (its
    figures reach Prometheus while its router lives)."""
    mesh = em.Mesh.start(tiny_checkpoint("mixtral"), name="dashrecover", context_shards=1, expert_groups=2)
    try:
        want = mesh.generate([5, 17, 42], max_new_tokens=4).token_ids
        counted = f'{dashboard.metric("expertmesh_recoveries_total")}{{router="dashrecover.router"}}'
        deadline = time.time() + 90  # an export interval and a scrape; more on a loaded machine
        while not query(prometheus, counted):  # increase() sees the first event only after a 0
            assert time.time() < deadline, "the router's recovery counters did not reach Prometheus at 0"
            time.sleep(0.5)
        ray.kill(mesh.groups[1], no_restart=False)
        while actor_info(mesh.groups[1]) == ("ALIVE", 0):  # the kill has struck (not after the next step)
            time.sleep(0.05)
        assert mesh.generate([5, 17, 42], max_new_tokens=4).token_ids == want  # exact through the recovery
        events = ray.get(mesh.router.stats.remote())["recoveries"]
        assert events, "the killed expert group left no recovery event"
        yield events
    finally:
        mesh.shutdown()


def test_every_panel_answers_on_a_real_prometheus(server, prometheus, ray_cluster, recovered):
    start = time.time()
    interval_s = ray_cluster._config.metrics_report_interval_ms() / 1000
    assert json.loads(COMMITTED.read_text()) == dashboard.dashboard()  # the committed file is what is checked
    panels = dashboard.queries(json.loads(COMMITTED.read_text()))
    ctx = httpx.post(f"{server}/v1/contexts", headers=h("acme"), timeout=120,
                     json={"text": CONTEXT, "visibility": "private", "name": "dashboard"})
    assert ctx.status_code == 201, ctx.text
    context = ctx.json()
    try:
        first = wave(server, context["id"])
        # the first wave makes every series exist in Prometheus; the second is counted from here
        base = settle(prometheus, time.time(), interval_s, lambda t: all(
            t["requests"].get(n, 0) >= first["tenants"][n]["requests"] for n in ("acme", "globex"))
            and t["refused"].get("tiny", 0) >= 1)
        second = wave(server, context["id"])
        sent = second["tenants"]
        end = settle(prometheus, time.time(), interval_s, lambda t: all(
            t["requests"].get(n, 0) >= base["requests"][n] + sent[n]["requests"] for n in sent)
            and t["refused"]["tiny"] >= base["refused"]["tiny"] + 1)
        # the server's context: its tokens and KV on its 3 shards (gauges set every 2 s)
        memory = dashboard.metric("expertmesh_kv_pool_bytes")
        settle(prometheus, time.time(), interval_s, lambda t: len(by(
            prometheus, f'sum by (shard) ({memory}{{mesh="expertmesh", tier="store"}}) > 0', "shard")) == 3)
    finally:
        httpx.delete(f"{server}/v1/contexts/{context['id']}", headers=h("acme"), timeout=60)

    # the figures agree with the load: what each tenant sent in the second wave is counted
    for tenant in sent:
        for key in ("requests", "prompt", "completion"):
            assert end[key][tenant] - base[key][tenant] >= sent[tenant][key], (tenant, key, base, end)
        assert end["ttft"][tenant] - base["ttft"][tenant] >= sent[tenant]["requests"]
    assert end["shards"] - base["shards"] >= second["shards"] > 0
    assert end["expert"] - base["expert"] >= second["expert_tokens"] > 0

    # every panel's query answers, with data. The session's Ray cluster also ran other meshes
    # (their routers idle now: a quantile over no steps is NaN), so figures are checked below on
    # this server's series; each query has at least one finite figure and none below zero
    answers = {}
    for title, legend, expr in panels:
        deadline = time.time() + 30  # a scrape that failed on the loaded machine marks its series stale
        while not (result := query(prometheus, dashboard.expand(expr, WINDOW))) and time.time() < deadline:
            time.sleep(1)
        assert result, f"{title} ({legend}): no data for {dashboard.expand(expr, WINDOW)}"
        values = [float(s["value"][1]) for s in result]
        assert any(math.isfinite(v) for v in values) and not any(v < 0 for v in values), (title, legend, result)
        answers[title, legend] = result

    def series(title: str, legend: str, label: str) -> dict[str, float]:
        return {s["metric"].get(label, ""): float(s["value"][1]) for s in answers[title, legend]}

    # both tenants are seen, at a rate above zero; the refusal is tiny's token rate (429)
    for title, legend in (("Requests per second, by tenant", "{{tenant}}"),
                          ("Tokens per second, by tenant", "{{tenant}} completion"),
                          ("Tokens per second, by tenant", "{{tenant}} prompt")):
        rates = series(title, legend, "tenant")
        assert rates.get("acme", 0) > 0 and rates.get("globex", 0) > 0, (title, legend, rates)
    refusals = {(s["metric"]["reason"], s["metric"]["status"]): float(s["value"][1])
                for s in answers["Refusals per second, by reason", "{{reason}} ({{status}})"]}
    assert refusals.get(("token_rate", "429"), 0) > 0, refusals
    http = {(s["metric"].get("route"), s["metric"].get("status_code")): float(s["value"][1])
            for s in answers["HTTP responses per second, by route and status", "{{route}} {{status_code}}"]}
    assert http.get(("/v1/completions", "200"), 0) > 0 and http.get(("/v1/completions", "429"), 0) > 0, http
    p50, p99 = (series("HTTP request latency (p50, p99), whole request", q, "")[""] for q in ("p50", "p99"))
    assert 0 < p50 <= p99, (p50, p99)
    # latencies: 0 < p50 <= p99 <= 60 s (the buckets' range)
    for title in ("Time to first token (p50, p99)", "Inter-token latency (p50, p99)"):
        p50, p99 = (series(title, q, "")[""] for q in ("p50", "p99"))
        assert 0 < p50 <= p99 <= 60, (title, p50, p99)
    p99 = series("Time to first token p99, by tenant", "{{tenant}}", "tenant")
    assert 0 < p99["acme"] <= 60 and 0 < p99["globex"] <= 60, p99
    router = "expertmesh.router"  # the e2e server's mesh (ServeSettings.mesh_name)
    assert 0 < series("Router step time (p50, p99), by router", "{{router}} p99", "router")[router] <= 60
    # the mesh: acme's context on 3 shards, each visited; 2 expert groups sharing the tokens
    assert len(context["shards"]) == 3
    visited = series("Requests per second, by context shard", "shard {{shard}}", "shard")
    assert len([v for v in visited.values() if v > 0]) >= 3, visited
    assert series("Context shards visited per request", "mean", "")[""] > 0
    share = series("Expert-group token share", "group {{group}}", "group")
    assert len([v for v in share.values() if v > 0]) >= 2 and abs(sum(share.values()) - 1) < 1e-6, share
    # the queue is empty once the load is done; the data plane formed a group and refused no one
    assert series("Queue: requests in flight, waiting, running", "in flight (Serve)", "")[""] == 0
    assert router in series("Queue: requests in flight, waiting, running", "waiting at {{router}}", "router")
    assert series("Data-plane groups formed", "{{router}} ({{transport}})", "router")[router] >= 1
    refused = {s["metric"]["reason"]: float(s["value"][1])
               for s in answers["Data-plane connections refused, by reason", "{{router}} {{reason}}"]
               if s["metric"]["router"] == router}
    assert refused == {"handshake": 0, "malformed": 0}, refused
    # the KV pool: the server's context (4,484 tokens over 3 shards) held in the store tier and read
    # from memory; the routers see contexts; every MoE layer's balancedness is >= 1
    pool = {(s["metric"]["shard"], s["metric"]["tier"]): float(s["value"][1])
            for s in answers["KV cache held, by shard and tier", "{{mesh}} shard {{shard}} {{tier}}"]
            if s["metric"]["mesh"] == "expertmesh"}
    # (held in the store on all 3 was awaited above, before the context was deleted: the panel
    # shows each shard's series, whose figures may have dropped since, the scrape being later)
    assert {sh for (sh, tier) in pool if tier == "store"} >= {"0", "1", "2"}, pool
    budget = series("KV cache held, by shard and tier", "{{mesh}} shard {{shard}} memory budget", "shard")
    assert all(v > 0 for v in budget.values()) and len(budget) >= 3, budget
    reads = series("Pages read per second, by tier", "{{tier}}", "tier")
    assert reads.get("memory", 0) > 0, reads
    assert series("Contexts and their tokens", "contexts", "")[""] >= 0
    balance = series("Expert-group balancedness, by router", "{{router}} worst layer", "router")
    assert balance[router] >= 1 and balance["dashrecover.router"] >= 1, balance
    # the killed expert group's recovery, by the kinds the router listed
    kinds = series("Recoveries, by kind", "{{kind}}", "kind")
    assert {e["kind"] for e in recovered} <= {k for k, v in kinds.items() if v > 0}, (kinds, recovered)
    # the dashboard's variables find their values (Grafana's label_values: the series API)
    r = httpx.get(f"{prometheus}/api/v1/label/tenant/values",
                  params={"match[]": dashboard.metric("expertmesh_requests_total")}, timeout=10)
    assert {"acme", "globex"} <= set(r.json()["data"]), r.text
    print(f"dashboard checked on Prometheus in {time.time() - start:.1f} s")
