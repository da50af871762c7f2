"""The pool changed over Serve's HTTP API (POST /v1/pool/{action}) by an admin tenant while the
server answers: expert groups and a context shard added and taken out, segments moved; the same
text before, between and after each change. Other tenants get 403. On the session's server
(`expertmesh serve`, 3 shards + 2 groups), which it leaves as it found it."""

import httpx

from tests.e2e.conftest import KEYS


def auth(tenant: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def test_admin_tenant_changes_the_pool_over_http_and_answers_stay_the_same(server):
    with httpx.Client(base_url=server, timeout=300) as http:
        ctx = http.post("/v1/contexts", headers=auth("ops"), json={
            "token_ids": [(11 * i) % 250 + 4 for i in range(240)], "mode": "exact", "name": "pool-ops"})
        assert ctx.status_code == 201, ctx.text
        body = {"model": "expertmesh", "prompt": [5, 17, 42, 99], "context_id": ctx.json()["id"], "max_tokens": 16,
                "temperature": 0.0}

        def text() -> str:
            r = http.post("/v1/completions", headers=auth("ops"), json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        def change(action: str, **args) -> dict:
            r = http.post(f"/v1/pool/{action}", headers=auth("ops"), json=args)
            assert r.status_code == 200, (action, r.text)
            assert r.json()["action"] == action
            return r.json()["result"]

        want = text()
        for tenant in ("acme", "globex"):
            refused = http.post("/v1/pool/add-groups", headers=auth(tenant), json={"count": 1})
            assert refused.status_code == 403 and refused.json()["error"]["code"] == "not_admin", refused.text
            assert tenant in refused.json()["error"]["message"]
        unknown = http.post("/v1/pool/explode", headers=auth("ops"), json={})
        assert unknown.status_code == 404 and "add-shards" in unknown.json()["error"]["message"], unknown.text
        bad = http.post("/v1/pool/remove-groups", headers=auth("ops"), json={})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "indices", bad.text
        bad = http.post("/v1/pool/add-shards", headers=auth("ops"), json={"count": 0})
        assert bad.status_code == 400, bad.text
        bad = http.post("/v1/pool/remove-shards", headers=auth("ops"), json={"indices": [99]})
        assert bad.status_code == 400 and "99" in bad.json()["error"]["message"], bad.text

        added = change("add-groups", count=1)["added"]
        assert len(added) == 1 and text() == want
        assert change("remove-groups", indices=added)["removed"] == added and text() == want
        shard = change("add-shards", count=1)["added"]
        assert shard == [3] and text() == want
        change("rebalance")
        change("remove-shards", indices=shard)
        assert text() == want
        pool = http.get("/v1/pool", headers=auth("ops")).json()
        assert 3 not in [s["index"] for s in pool["shards"] if s["state"] == "ALIVE"], pool["shards"]
        assert http.delete(f"/v1/contexts/{ctx.json()['id']}", headers=auth("ops")).status_code == 200
