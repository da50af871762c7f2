"""The service outlives its parts: kill the Serve replica, its proxy or the router mid-stream;
a client that retries is served again within seconds, with the same tokens and its contexts.

Runs against the session's `expertmesh serve` (tests/e2e/conftest.py); every test leaves it
healthy. Recovery times are printed (`pytest -s`) and kept in docs/faults.md.
"""

import json
import time

import httpx
import pytest
import ray

import expertmesh as em
from tests.e2e.conftest import KEYS

pytestmark = [pytest.mark.ray, pytest.mark.e2e]
H = {"Authorization": f"Bearer {KEYS['acme']}"}
CONTEXT = "The harbour master keeps the ledger. The tide turns at six. " * 10


def body(context_id=None, stream=False, max_tokens=48):
    return {"model": "expertmesh", "prompt": " When does the tide turn?", "max_tokens": max_tokens,
            "temperature": 0, "stream": stream, **({"context_id": context_id} if context_id else {})}


def serve_actor(prefix: str):
    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    assert names, f"no {prefix} actor"
    return ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])


def complete(server, context_id=None, timeout=60.0) -> tuple[str, float]:
    """The completion's text once the server answers 200 again, and how long that took."""
    t0, last = time.perf_counter(), None
    while time.perf_counter() - t0 < timeout:
        try:
            r = httpx.post(f"{server}/v1/completions", headers=H, json=body(context_id), timeout=30)
            if r.status_code == 200:
                return r.json()["choices"][0]["text"], time.perf_counter() - t0
            last = r.status_code, r.headers.get("retry-after"), r.text[:300]
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    pytest.fail(f"not served again within {timeout} s: {last}")


def stream_then_kill(server, victim, context_id=None) -> tuple[str, str | None]:
    """Stream a completion, kill `victim` after the first chunk; (text received, error event or None)."""
    text, error = [], None
    try:
        with httpx.stream("POST", f"{server}/v1/completions", headers=H, json=body(context_id, True, 64),
                          timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]["code"]
                    continue
                text.append(event["choices"][0]["text"])
                if victim is not None and len(text) == 2:
                    ray.kill(victim, no_restart=False)
                    victim = None
    except httpx.HTTPError as exc:  # the replica or proxy went away under the stream
        error = type(exc).__name__
    return "".join(text), error


@pytest.fixture(scope="module")
def context(server):
    r = httpx.post(f"{server}/v1/contexts", headers=H, json={"text": CONTEXT}, timeout=120)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_killed_replica_is_replaced_and_attaches_to_the_mesh(server, context):
    want, _ = complete(server, context)
    _, error = stream_then_kill(server, serve_actor("SERVE_REPLICA::expertmesh"), context)
    text, seconds = complete(server, context)
    print(f"\nServe replica killed mid-stream ({error}): served again after {seconds:.2f} s")
    assert text == want  # the same mesh: its context survived the replica
    assert len(ray.get(em.Mesh.attach("expertmesh").router.list_contexts.remote())) >= 1


def test_killed_proxy_loses_no_context(server, context):
    want, _ = complete(server, context)
    _, error = stream_then_kill(server, serve_actor("SERVE_PROXY_ACTOR"), context)
    text, seconds = complete(server, context)
    print(f"\nServe proxy killed mid-stream ({error}): served again after {seconds:.2f} s")
    assert text == want


def test_killed_router_mid_stream_gives_the_same_tokens(server):
    want, _ = stream_then_kill(server, None)
    t0 = time.perf_counter()
    text, error = stream_then_kill(server, em.Mesh.attach("expertmesh").router)
    print(f"\nrouter killed mid-stream over HTTP: the stream went on and ended {time.perf_counter() - t0:.2f} s "
          f"after the request started")
    assert error is None and text == want  # replayed once the router was back (greedy: same tokens)


def test_tenant_limits_hold_across_replicas(ray_cluster):
    from expertmesh.pipelines.serve import TenantLimits

    spec = {"tenants": [{"name": "solo", "api_key_sha256": "a" * 64, "max_concurrent_requests": 1,
                         "tokens_per_minute": 1000, "max_context_tokens": 10}]}
    limits = TenantLimits.remote(spec)

    @ray.remote(num_cpus=0)
    class Replica:
        def id(self):
            return ray.get_runtime_context().get_actor_id()

    first, second = Replica.remote(), Replica.remote()
    for r in (first, second):
        ray.get(limits.update.remote(spec, ray.get(r.id.remote()), r))
    ray.get(limits.acquire.remote("solo", 10, ray.get(first.id.remote())))
    with pytest.raises(Exception, match="1 requests in flight"):  # a second replica sees the first's request
        ray.get(limits.acquire.remote("solo", 10, ray.get(second.id.remote())))
    first_id = ray.get(first.id.remote())
    ray.kill(first)  # died with its request in flight: its hold is freed, not leaked
    time.sleep(0.5)
    ray.get(limits.acquire.remote("solo", 10, ray.get(second.id.remote())))
    ray.get(limits.release.remote("solo", 0, first_id))  # a late release of a forgotten hold changes nothing
    with pytest.raises(Exception, match="1 requests in flight"):
        ray.get(limits.acquire.remote("solo", 10, "someone"))
    ray.kill(limits)
    ray.kill(second)


def test_replicas_racing_to_start_share_one_mesh(ray_cluster, tiny_checkpoint):
    import concurrent.futures as cf

    start = dict(checkpoint=tiny_checkpoint("mixtral"), context_shards=1, expert_groups=1)
    with cf.ThreadPoolExecutor(2) as pool:
        meshes = list(pool.map(lambda _: em.Mesh.attach_or_start("race", 120, **start), range(2)))
    assert meshes[0].router._actor_id == meshes[1].router._actor_id
    assert meshes[0].generate([5, 6, 7], max_new_tokens=3).token_ids == meshes[1].generate(
        [5, 6, 7], max_new_tokens=3).token_ids
    meshes[0].shutdown()  # an attached handle lets go ...
    assert em.Mesh.attach("race").generate([5], max_new_tokens=1)
    meshes[0].shutdown(stop_actors=True)  # ... stopping is explicit
    time.sleep(0.5)
    with pytest.raises(ValueError, match="no running mesh"):
        em.Mesh.attach("race")
