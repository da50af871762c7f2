"""Serve with two replicas over a mesh of two routers: requests spread over both routers, and
streams in flight when a router is killed complete with the same text (they fail over)."""

import concurrent.futures as cf
import json
import threading
import time

import httpx
import pytest
import ray
from ray import serve

import expertmesh as em
from expertmesh.pipelines.serve import ExpertMeshServer

pytestmark = [pytest.mark.ray, pytest.mark.e2e]
APP, PREFIX, MESH = "routers2", "/routers2", "routers2"


def stream(url: str, body: dict, started: threading.Semaphore | None = None) -> str:
    """The completion's text; `started` is released at its first token."""
    text = ""
    with httpx.stream("POST", f"{url}/v1/completions", json=body | {"stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                text += event["choices"][0]["text"]
                if started is not None and text:
                    started.release()
                    started = None
    return text


def test_two_replicas_over_two_routers_spread_and_survive_a_router_kill(server, tiny_checkpoint):
    serve.run(ExpertMeshServer.options(num_replicas=2).bind(
        {"checkpoint": tiny_checkpoint("mixtral"), "context_shards": 2, "expert_groups": 1, "routers": 2,
         "mesh_name": MESH, "max_completion_tokens": 64}), name=APP, route_prefix=PREFIX)
    url = f"{server}{PREFIX}"
    try:
        mesh = em.Mesh.attach(MESH)
        assert len(mesh.routers) == 2
        body = {"model": "expertmesh", "prompt": "The tide turns at six.", "max_tokens": 40, "temperature": 0}
        want = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        with cf.ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(lambda _: stream(url, body), range(8)))
        assert texts == [want] * 8
        assert all(r["steps"] > 0 for r in mesh.stats()["routers"])  # both routers served

        # sampled with no seed: the server fixes one, so a replay draws the tokens already sent (64 tokens: the
        # streams still run when the router dies, each has sent some)
        sampled = body | {"temperature": 1.0, "max_tokens": 64, "ignore_eos": True}
        started = threading.Semaphore(0)
        with cf.ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(stream, url, body) for _ in range(8)]
            drawn = [pool.submit(stream, url, sampled, started) for _ in range(4)]
            for _ in drawn:
                assert started.acquire(timeout=60)
            ray.kill(mesh.routers[0], no_restart=False)
            t0 = time.monotonic()
            texts = [f.result(timeout=120) for f in futures]
            assert all(f.result(timeout=120) for f in drawn)  # sampled streams go on too: no error event
        print(f"\nSERVE two routers: router 0 killed under 12 streams; all done {time.monotonic() - t0:.2f} s later")
        assert texts == [want] * 8
    finally:
        serve.delete(APP)
        em.Mesh.attach(MESH).shutdown(stop_actors=True)
