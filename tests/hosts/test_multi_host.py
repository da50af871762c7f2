"""The mesh on real hosts: a Ray cluster of four hosts, each a Linux network namespace with its
own address (netns.py), `ray start` per host with token authentication. The data plane crosses
hosts over TCP. Whole hosts are killed (SIGKILL of every process in a namespace, as a
preempted node) while a stream is in flight, with Ray's default node failure detection.

Hosts: 0 (head): router + expert group; 1, 2: a context shard each; 3: an expert group.
Figures go to stdout (`pytest -s`) and, with EXPERTMESH_RESULTS=<file>, to a JSON file
(benchmarks/results/multi_host.json is made so)."""

import json
import os

import pytest

from tests.hosts.netns import Hosts, unavailable

WHY = unavailable()
pytestmark = [pytest.mark.ray, pytest.mark.e2e,
              pytest.mark.skipif(WHY is not None, reason=f"multi-host suite skipped: {WHY}")]

DRIVER = r'''
import json, sys, threading, time
import numpy as np
import ray
import torch
import expertmesh as em
from expertmesh.actors.liveness import actor_state
from expertmesh.model.checkpoint import load_model
from tests.faults import wait_until_served_by
from tests.hosts.netns import Hosts

hosts = Hosts.attach()
ckpt, store = sys.argv[1], sys.argv[2]
ray.init(address=hosts.head)
out = {}
mesh = em.Mesh.start(ckpt, context_shards=2, expert_groups=2, address=hosts.head, store=store, page_size=16)
where = lambda h: ray.get(h.__ray_call__.remote(lambda self: ray.util.get_node_ip_address()), timeout=30)
out["placement"] = {"router": where(mesh.router), "shards": [where(s) for s in mesh.shards],
                    "groups": [where(g) for g in mesh.groups]}
context, prompt = [(7 * i) % 290 + 4 for i in range(400)], [5, 17, 42, 99, 7, 3]
ctx = mesh.register_context(context, mode="exact")
want = load_model(ckpt)(torch.tensor(context + prompt))[-len(prompt):].detach().numpy()
got = mesh.forward_logits(prompt, context_id=ctx.id)
out["exact_over_tcp"] = float(np.abs(got - want).max())
out["transport"] = ray.get(mesh.router.stats.remote())["transport"]
tokens = mesh.generate(prompt, context_id=ctx.id, max_new_tokens=32).token_ids

def kill_mid_stream(host, victim):
    """Kill a host under a stream: (stream result, seconds to the end of the stream, seconds
    until Ray stopped reporting the victim actor alive)."""
    gen = mesh.router.stream.options(num_returns="streaming").remote(prompt, ctx.id, 32, 0.0)
    got = list(ray.get(next(gen))["tokens"])
    seen = {}
    t0 = time.monotonic()
    def watch():
        while time.monotonic() - t0 < 120 and actor_state(victim) == "ALIVE":
            time.sleep(0.1)
        seen["detected"] = time.monotonic() - t0
    w = threading.Thread(target=watch, daemon=True)
    hosts.kill(host)
    w.start()
    try:
        for ref in gen:
            got += ray.get(ref).get("tokens", [])
        result = "same tokens" if got == tokens else f"other tokens {got}"
    except Exception as exc:
        result = f"{type(exc).__name__}: {str(exc)[:300]}"
    took = time.monotonic() - t0
    w.join(130)
    logits = float(np.abs(mesh.forward_logits(prompt, context_id=ctx.id) - want).max())
    return {"stream": result, "served_again_s": took, "ray_reported_s": seen.get("detected"), "max_abs_diff": logits}

k = out["placement"]["shards"].index(hosts.address(1))  # the shard on host 1
g = out["placement"]["groups"].index(hosts.address(3))  # the expert group on host 3
out["lost_shard"], out["lost_group"] = k, g
out["shard_host_killed"] = kill_mid_stream(1, mesh.shards[k])
t0 = time.monotonic()
out["new_context_while_down"] = list(mesh.register_context(list(range(9, 120)), mode="exact").shards)
hosts.add(4, {"context_shard": 1})  # a replacement host: the shard restarts there and takes its segment back
joined = time.monotonic() - t0
wait_until_served_by(mesh, k, ctx.id, lambda: mesh.forward_logits(prompt, context_id=ctx.id))
out["replacement"] = {"host_joined_s": joined, "handed_back_s": time.monotonic() - t0, "shard_on": where(mesh.shards[k]),
                      "max_abs_diff": float(np.abs(mesh.forward_logits(prompt, context_id=ctx.id) - want).max())}
out["expert_host_killed"] = kill_mid_stream(3, mesh.groups[g])
out["adopted"] = ray.get(mesh.groups[1 - g].stats.remote())["adopted_experts"]
print("RESULT " + json.dumps(out))
mesh.shutdown()
'''


@pytest.fixture
def hosts():
    h = Hosts.create()
    try:
        yield h
    finally:
        h.close()


def test_four_hosts_tcp_exact_and_hosts_killed_mid_stream(hosts, tiny_checkpoint, tmp_path):
    hosts.add(0, {"router": 1, "expert_group": 1}, num_cpus=2)
    for i, res in ((1, {"context_shard": 1}), (2, {"context_shard": 1}), (3, {"expert_group": 1})):
        hosts.add(i, res)
    proc = hosts.driver(DRIVER, tiny_checkpoint("mixtral"), str(tmp_path / "store"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
    print("\nMULTIHOST " + json.dumps(out, indent=1))
    if os.environ.get("EXPERTMESH_RESULTS"):
        with open(os.environ["EXPERTMESH_RESULTS"], "w") as f:
            json.dump(out, f, indent=1)
    a = [hosts.address(i) for i in range(5)]
    p = out["placement"]  # by Ray resources: each actor on a host declaring its kind
    assert p["router"] == a[0] and sorted(p["shards"]) == [a[1], a[2]] and sorted(p["groups"]) == [a[0], a[3]]
    assert out["transport"] == "socket" and out["exact_over_tcp"] <= 1e-5
    for what in ("shard_host_killed", "expert_host_killed"):
        k = out[what]
        assert k["stream"] == "same tokens" and k["served_again_s"] < 45 and k["max_abs_diff"] <= 1e-5, (what, k)
    assert out["new_context_while_down"] == [1 - out["lost_shard"]]
    r = out["replacement"]
    assert r["shard_on"] == a[4] and r["handed_back_s"] < 90 and r["max_abs_diff"] <= 1e-5
    assert len(out["adopted"]) == 1  # the other group holds the lost group's experts
