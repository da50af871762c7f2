"""A shard's host is removed and no host can take its place (a simulated multi-node cluster:
`ray.cluster_utils.Cluster`, raylets on one address). Ray reports the shard's actor not alive;
the router leaves it out of the data plane at once (liveness.py) instead of waiting out a
timeout. With a store the other shard serves its segments (takeover.py): requests in flight
and later ones are answered, exactly, and when a host with room joins, the shard restarts there
and takes its segments back. Without a store its contexts fail at once, naming it, and every
other call is served."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.e2e]

SCRIPT = r'''
import json, sys, threading, time
import numpy as np
import ray
from ray.cluster_utils import Cluster
import expertmesh as em
from tests.faults import chunk_tokens, greedy_stream, wait_until_served_by

store = sys.argv[2] or None
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {
    "expert_group": 2, "context_shard": 1, "router": 1}})  # the router stays on the head
shard_host = cluster.add_node(num_cpus=1, resources={"context_shard": 1})
ray.init(address=cluster.address)
mesh = em.Mesh.start(sys.argv[1], context_shards=2, expert_groups=2, address=cluster.address, page_size=16,
                     store=store)
prompt = [5, 6, 7]
ctx = mesh.register_context(list(range(4, 200)), mode="exact")
want = mesh.forward_logits(prompt, context_id=ctx.id)
tokens = mesh.generate(prompt, context_id=ctx.id, max_new_tokens=40).token_ids
out = {}
gen = greedy_stream(mesh.router, prompt, ctx.id, 40)
got = chunk_tokens(ray.get(next(gen)))
cluster.remove_node(shard_host)  # shard 1's host is gone mid-stream; nowhere else fits it
t0 = time.monotonic()
try:
    for ref in gen:
        got += chunk_tokens(ray.get(ref))
    out["in_flight"] = ["ok" if got == tokens else "wrong tokens", "", time.monotonic() - t0]
except Exception as exc:
    out["in_flight"] = [type(exc).__name__, str(exc), time.monotonic() - t0]

def logits():
    diff = float(np.abs(mesh.forward_logits(prompt, context_id=ctx.id) - want).max())
    assert diff <= 1e-5, diff
    return diff

for what, fn in [("contexts", lambda: len(mesh.contexts())),
                 ("generate", lambda: mesh.generate(prompt, max_new_tokens=3).token_ids),
                 ("generate_over_context", logits),
                 ("register", lambda: mesh.register_context(list(range(4, 100)), mode="exact").shards),
                 ("drop", lambda: mesh.drop_context(ctx.id) if not store else None)]:
    t0 = time.monotonic()
    try:
        value = fn()
        out[what] = ["ok", repr(value), time.monotonic() - t0]
    except Exception as exc:
        out[what] = [type(exc).__name__, str(exc), time.monotonic() - t0]
if store:  # capacity returns: the shard restarts on the new host and takes its segment back
    cluster.add_node(num_cpus=1, resources={"context_shard": 1})
    took = wait_until_served_by(mesh, 1, ctx.id, logits)
    out["handed_back"] = ["ok" if ctx.id in ray.get(mesh.shards[1].contexts.remote()) else "no", "", took]
    out["after"] = ["ok", repr(logits()), 0.0]
print(json.dumps(out))
mesh.shutdown(); ray.shutdown(); cluster.shutdown()
'''


def run(checkpoint, store=""):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, checkpoint, store], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for what, (kind, message, took) in out.items():
        print(f"HOSTLOSS {'store' if store else 'no store'} {what}: {kind} after {took:.1f} s {message[:160]}")
    return out


def test_a_lost_shard_host_with_a_store_costs_nothing_in_flight_and_its_segments_come_back(tiny_checkpoint,
                                                                                          tmp_path):
    out = run(tiny_checkpoint("mixtral"), str(tmp_path / "store"))
    assert out["in_flight"][0] == "ok" and out["in_flight"][2] < 10  # the stream goes on, same tokens
    for what in ("contexts", "generate", "generate_over_context", "drop"):
        assert out[what][0] == "ok" and out[what][2] < 10, (what, out[what])
    assert out["register"][:2] == ["ok", "(0,)"]  # new contexts go to the shard that is running
    assert out["handed_back"][0] == "ok" and out["after"][0] == "ok"


def test_a_lost_shard_host_without_a_store_fails_its_contexts_only_naming_it(tiny_checkpoint):
    out = run(tiny_checkpoint("mixtral"))
    kind, message, took = out["in_flight"]  # its segment died with the shard's memory
    assert "ContextNotFound" in kind and "lost with context shard 1: Ray reports its actor" in message and took < 10
    for what in ("contexts", "generate"):
        assert out[what][0] == "ok" and out[what][2] < 10, (what, out[what])
    for what in ("generate_over_context", "drop"):  # the context is gone: said at once, every time
        kind, message, took = out[what]
        assert kind == "ContextNotFound" and "lost with context shard 1" in message and took < 10, (what, out[what])
    assert out["register"][:2] == ["ok", "(0,)"]
