"""The OpenAI-compatible HTTP API, end to end with the real `openai` client and httpx."""

import concurrent.futures as cf

import httpx
import openai
import pytest

from tests.e2e.conftest import KEYS

pytestmark = [pytest.mark.ray, pytest.mark.e2e]
CONTEXT = "The grass is green. The sky is blue. The pass key is 4242. " * 80  # 4,720 tokens: 3 chunks of 2048


def client(url, tenant="acme"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS[tenant], max_retries=0)


def h(tenant):
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


@pytest.fixture(scope="module")
def contexts(server):
    priv = httpx.post(f"{server}/v1/contexts", headers=h("acme"), timeout=120,
                      json={"text": CONTEXT, "visibility": "private", "name": "acme-notes"})
    shared = httpx.post(f"{server}/v1/contexts", headers=h("acme"), timeout=120,
                        json={"text": CONTEXT[:400], "visibility": "shared", "mode": "blockwise"})
    assert priv.status_code == 201, priv.text
    assert shared.status_code == 201, shared.text
    return priv.json(), shared.json()


def test_health_models_and_auth(server):
    assert httpx.get(f"{server}/healthz").status_code == 200
    assert [m.id for m in client(server).models.list().data] == ["expertmesh"]
    r = httpx.get(f"{server}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_context_endpoints_and_isolation(server, contexts):
    priv, shared = contexts
    assert priv["object"] == "context" and priv["owner"] == "acme" and priv["num_tokens"] == len(CONTEXT)
    assert priv["visibility"] == "private" and priv["name"] == "acme-notes" and len(priv["shards"]) == 3
    assert httpx.get(f"{server}/v1/contexts/{priv['id']}", headers=h("acme")).status_code == 200
    # another tenant never sees a private context, but uses a shared one
    r = httpx.get(f"{server}/v1/contexts/{priv['id']}", headers=h("globex"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "context_not_found"
    ids = [c["id"] for c in httpx.get(f"{server}/v1/contexts", headers=h("globex")).json()["data"]]
    assert shared["id"] in ids and priv["id"] not in ids
    with pytest.raises(openai.NotFoundError):
        client(server, "globex").completions.create(model="expertmesh", prompt="Hi", max_tokens=2,
                                                    extra_body={"context_id": priv["id"]})
    ok = client(server, "globex").completions.create(model="expertmesh", prompt=" The pass key is", max_tokens=4,
                                                     temperature=0, extra_body={"context_id": shared["id"]})
    assert ok.usage.context_tokens == 400
    assert httpx.delete(f"{server}/v1/contexts/{shared['id']}", headers=h("globex")).status_code == 403
    assert httpx.delete(f"{server}/v1/contexts/{priv['id']}", headers=h("globex")).status_code == 404


def test_completions_chat_and_streaming_agree(server, contexts):
    priv, _ = contexts
    c = client(server)
    kw = dict(model="expertmesh", max_tokens=12, temperature=0, extra_body={"context_id": priv["id"]})
    full = c.completions.create(prompt=" What is the pass key?", **kw)
    assert full.choices[0].finish_reason in ("length", "stop")
    assert full.usage.prompt_tokens == len(" What is the pass key?") and full.usage.context_tokens == len(CONTEXT)
    assert full.model_extra["pathway"]["shards"]
    chunks = list(c.completions.create(prompt=" What is the pass key?", stream=True, **kw))
    assert "".join(ch.choices[0].text for ch in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    chat = c.chat.completions.create(messages=[{"role": "user", "content": "What is the pass key?"}], **kw)
    assert chat.choices[0].message.role == "assistant"
    stream = c.chat.completions.create(messages=[{"role": "user", "content": "What is the pass key?"}],
                                       stream=True, **kw)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == chat.choices[0].message.content


def test_stop_strings_end_the_completion(server):
    c = client(server)
    full = c.completions.create(model="expertmesh", prompt="abc", max_tokens=64, temperature=0)
    base = full.choices[0].text
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 64, full
    stop = base[1:3]
    assert base.find(stop) == 1 and base.isascii(), base  # byte tokenizer: one token per character
    cut = c.completions.create(model="expertmesh", prompt="abc", max_tokens=64, temperature=0, stop=[stop])
    assert cut.choices[0].text == base[: base.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    # the router stopped generating (the request was cancelled), it did not run on to max_tokens:
    # 3 tokens reach the stop string, a few more may be in flight when the cancel arrives
    assert cut.usage.completion_tokens <= 16, cut.usage
    chunks = list(c.completions.create(model="expertmesh", prompt="abc", max_tokens=64, temperature=0,
                                       stop=[stop], stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == base[: base.find(stop)]
    usage = [ch.usage for ch in chunks if ch.usage]
    assert usage and usage[-1].completion_tokens <= 16, usage


def test_bad_requests_get_clear_errors(server):
    def post(body, tenant="acme", path="/v1/completions"):
        return httpx.post(f"{server}{path}", headers=h(tenant), json=body, timeout=60)

    r = post({"model": "expertmesh", "prompt": "x", "max_tokens": "many"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = post({"model": "gpt-9", "prompt": "x"})
    assert r.status_code == 404 and "expertmesh" in r.json()["error"]["message"]
    r = post({"model": "expertmesh", "prompt": [1, 99999]})
    assert r.status_code == 400 and "99999" in r.json()["error"]["message"]
    r = post({"model": "expertmesh", "prompt": "x", "max_tokens": 1000})
    assert r.status_code == 400 and "64" in r.json()["error"]["message"]
    r = post({"model": "expertmesh", "prompt": "x", "context_id": "ctx-missing"})
    assert r.status_code == 404
    r = post({"text": "x" * 51}, tenant="tiny", path="/v1/contexts")
    assert r.status_code == 413 and "max_context_tokens of 50" in r.json()["error"]["message"]
    r = post({"text": "a", "token_ids": [1]}, path="/v1/contexts")
    assert r.status_code == 400
    r = post({"model": "expertmesh", "prompt": "x" * 131073, "max_tokens": 1})  # server limit: 131,072
    assert r.status_code == 413 and r.json()["error"]["code"] == "prompt_too_long"
    assert "131072" in r.json()["error"]["message"]


def test_tenant_limits_give_429(server):
    def one(_):
        return httpx.post(f"{server}/v1/completions", headers=h("tiny"), timeout=120,
                          json={"model": "expertmesh", "prompt": "hello", "max_tokens": 40}).status_code

    with cf.ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(one, range(6)))
    assert 429 in codes and 200 in codes  # concurrency 1
    # one request at a time (concurrency never exceeded), 251 tokens each (prompt + max_tokens): the
    # bucket of 600 tokens per minute (refilling 10 per second) runs dry by the third request
    errors = []
    for _ in range(4):
        r = httpx.post(f"{server}/v1/completions", headers=h("tiny"), timeout=120,
                       json={"model": "expertmesh", "prompt": "y" * 250, "max_tokens": 1})
        if r.status_code != 200:
            errors.append(r)
            break
    assert errors and errors[0].status_code == 429, [e.text for e in errors]
    assert "token rate" in errors[0].json()["error"]["message"], errors[0].text
    # other tenants are unaffected
    assert client(server, "globex").completions.create(model="expertmesh", prompt="x", max_tokens=2).choices


def test_openapi_describes_the_api(server):
    spec = httpx.get(f"{server}/openapi.json").json()
    for path in ("/v1/models", "/v1/contexts", "/v1/contexts/{context_id}", "/v1/completions", "/v1/chat/completions"):
        assert path in spec["paths"]
    assert "context_id" in spec["components"]["schemas"]["CompletionRequest"]["properties"]


def test_full_server_queue_gives_503(server):
    """The server admits at most --max-queue (48) requests at once over all tenants; more get 503."""
    def one(k):
        tenant = "acme" if k % 2 else "globex"  # 32 each: under both tenants' concurrency limit of 40
        r = httpx.post(f"{server}/v1/completions", headers=h(tenant), timeout=300,
                       json={"model": "expertmesh", "prompt": "z" * 1500, "max_tokens": 64})
        return r.status_code, (r.json().get("error") or {}).get("code") if r.status_code != 200 else None

    with cf.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    codes = [c for c, _ in results]
    assert set(codes) <= {200, 503}, results
    assert codes.count(503) >= 1 and all(code == "queue_full" for c, code in results if c == 503), results
    assert codes.count(200) >= 48 - 8, results  # the queue was used, not refused early
    assert client(server).completions.create(model="expertmesh", prompt="x", max_tokens=2).choices


def test_metrics_reach_rays_metrics_system(server, ray_cluster):
    """The documented metric names (docs/observability.md's table), as exported by the node's
    metrics agent (Prometheus text)."""
    import re
    import time
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "observability.md").read_text()
    names = {n for line in doc.splitlines() if line.startswith("| `expertmesh_")
             for n in re.findall(r"`(expertmesh_[a-z_]+)`", line.split("|")[1])}
    assert len(names) >= 20, names
    # what every metric counts: a context (its KV, its pages read, the shards visited), a refusal
    ctx = httpx.post(f"{server}/v1/contexts", headers=h("acme"), timeout=120,
                     json={"text": "The metrics are counted here. " * 40, "name": "metrics"}).json()["id"]
    refused = httpx.post(f"{server}/v1/completions", headers=h("tiny"), timeout=60,
                         json={"model": "expertmesh", "prompt": "y" * 700, "max_tokens": 1})
    assert refused.status_code == 429
    client(server).completions.create(model="expertmesh", prompt="metrics", max_tokens=3, extra_body={"context_id": ctx})
    (node,) = [n for n in ray_cluster.nodes() if n["Alive"]]
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    deadline, missing = time.time() + 60, names
    while time.time() < deadline:  # gauges are live values: Ray drops one not refreshed for two intervals
        client(server).completions.create(model="expertmesh", prompt="metrics", max_tokens=2,
                                          extra_body={"context_id": ctx})
        text = httpx.get(url, timeout=10).text
        missing = {n for n in names if not re.search(rf"^ray_{n}(_bucket|_sum|_count|_total)?{{", text, re.M)}
        if not missing:
            break
        time.sleep(3)
    httpx.delete(f"{server}/v1/contexts/{ctx}", headers=h("acme"), timeout=60)
    assert not missing, f"not exported at {url}: {sorted(missing)}"
