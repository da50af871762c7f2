"""Placement on a simulated multi-node cluster: shards and expert groups land where declared."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.e2e]

SCRIPT = r'''
import json, sys
import numpy as np, ray, torch
from ray.cluster_utils import Cluster
import expertmesh as em

ckpt = sys.argv[1]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
shard_host = cluster.add_node(num_cpus=1, resources={"context_shard": 3})
expert_host = cluster.add_node(num_cpus=1, resources={"expert_group": 2})
ray.init(address=cluster.address)
mesh = em.Mesh.start(ckpt, context_shards=3, expert_groups=2, address=cluster.address, page_size=16)

def node(actor):
    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))

g = torch.Generator().manual_seed(0)
context = torch.randint(0, 300, (90,), generator=g).tolist()
prompt = torch.randint(0, 300, (6,), generator=g).tolist()
ctx = mesh.register_context(context)
logits = mesh.forward_logits(prompt, context_id=ctx.id)
print(json.dumps({
    "shard_nodes": [node(s) for s in mesh.shards], "group_nodes": [node(x) for x in mesh.groups],
    "router_node": node(mesh.router), "shard_host": shard_host.node_id, "expert_host": expert_host.node_id,
    "context": context, "prompt": prompt, "logits": logits.tolist(),
}))
mesh.shutdown()
ray.shutdown()
cluster.shutdown()
'''


def test_actors_land_on_the_hosts_that_declare_their_resources(tiny_checkpoint, hf_model):
    out = subprocess.run([sys.executable, "-c", SCRIPT, tiny_checkpoint("mixtral")], capture_output=True,
                         text=True, timeout=600, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(res["shard_nodes"]) == {res["shard_host"]}
    assert set(res["group_nodes"]) == {res["expert_host"]}
    with torch.no_grad():
        ref = hf_model("mixtral")(torch.tensor([res["context"] + res["prompt"]])).logits[0, -len(res["prompt"]):]
    assert np.abs(np.array(res["logits"]) - ref.numpy()).max() <= 1e-4
