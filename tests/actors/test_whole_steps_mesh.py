"""Whole steps on a real mesh (the default layout: a router and one colocated worker): the
logits and tokens of Hugging Face, one round trip a step, and a worker killed mid-stream (its
mirrors of the requests' KV die with it: the restarted worker computes them again)."""

import numpy as np
import pytest
import ray
import torch

import expertmesh as em
from tests.actors.test_mesh_parity import hf_generate, hf_logits, ids
from tests.faults import chunk_tokens, greedy_stream

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def mesh(ray_cluster, tiny_checkpoint):
    m = em.Mesh.start(tiny_checkpoint("mixtral"), context_shards=1, expert_groups=1, colocate=True, page_size=16)
    yield m
    m.shutdown()


def router_stats(mesh):
    return ray.get(mesh.router.stats.remote())


def test_whole_steps_give_hugging_faces_logits_and_tokens(mesh, hf_model):
    hf = hf_model("mixtral")
    context, prompt = ids(101, 11), ids(7, 12)
    ctx = mesh.register_context(context, mode="exact")
    try:
        before = router_stats(mesh)
        logits = mesh.forward_logits(prompt, context_id=ctx.id)
        assert np.abs(logits - hf_logits(hf, context + prompt)[-len(prompt):]).max() <= 1e-4
        res = mesh.generate(prompt, context_id=ctx.id, max_new_tokens=24)
        assert list(res.token_ids) == hf_generate(hf, context + prompt, 24)
        after = router_stats(mesh)
        assert after["whole_steps"] - before["whole_steps"] == after["steps"] - before["steps"] == 1 + 24
        assert res.pathway["shards"] == [0] and res.pathway["pages"][0]["pages"] > 0
        assert res.pathway["expert_group_tokens"] == {0: 2 * (len(prompt) + 23) * 2}  # top-2, 2 MoE layers
    finally:
        mesh.drop_context(ctx.id)


def test_a_worker_killed_mid_stream_gives_the_same_tokens(mesh):
    prompt = [5, 17, 42, 99, 7, 3]
    want = list(mesh.generate(prompt, max_new_tokens=40).token_ids)
    gen = greedy_stream(mesh.router, prompt, None, 40)
    tokens = chunk_tokens(ray.get(next(gen)))
    ray.kill(mesh.shards[0], no_restart=False)
    for ref in gen:
        tokens += chunk_tokens(ray.get(ref))
    assert tokens == want
    seen = ray.get(mesh.shards[0].whole_stats.remote())  # the restarted worker: the request computed again
    assert any(v["recomputed"] >= 1 for v in seen.values())
    assert torch.equal(torch.tensor(mesh.generate(prompt, max_new_tokens=40).token_ids), torch.tensor(want))
