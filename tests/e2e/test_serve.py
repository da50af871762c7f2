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
    base = c.completions.create(model="expertmesh", prompt="abc", max_tokens=20, temperature=0).choices[0].text
    assert len(base) >= 2
    stop = base[1:3] if len(base) >= 3 else base[1:]
    cut = c.completions.create(model="expertmesh", prompt="abc", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == base[: base.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_bad_requests_get_clear_errors(server):
    def post(body, tenant="acme", path="/v1/completions"):
        return httpx.post(f"{server}{path}", headers=h(tenant), json=body, timeout=60)

    r = post({"model": "expertmesh", "prompt": "x", "max_tokens": "many"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "max_tokens"
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
    assert r.status_code == 422


def test_tenant_limits_give_429(server):
    def one(_):
        return httpx.post(f"{server}/v1/completions", headers=h("tiny"), timeout=120,
                          json={"model": "expertmesh", "prompt": "hello", "max_tokens": 40}).status_code

    with cf.ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(one, range(6)))
    assert 429 in codes and 200 in codes  # concurrency 1 and 600 tokens per minute
    r = httpx.post(f"{server}/v1/completions", headers=h("tiny"), json={"model": "expertmesh", "prompt": "x"})
    assert r.status_code in (200, 429)
    # other tenants are unaffected
    assert client(server, "globex").completions.create(model="expertmesh", prompt="x", max_tokens=2).choices


def test_openapi_describes_the_api(server):
    spec = httpx.get(f"{server}/openapi.json").json()
    for path in ("/v1/models", "/v1/contexts", "/v1/contexts/{context_id}", "/v1/completions", "/v1/chat/completions"):
        assert path in spec["paths"]
    assert "context_id" in spec["components"]["schemas"]["CompletionRequest"]["properties"]
