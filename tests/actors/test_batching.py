"""Concurrent requests batch together and each gets exactly its own answer."""

import threading

import pytest
import torch

import expertmesh as em
from tests.conftest import VOCAB

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def mesh(ray_cluster, tiny_checkpoint):
    m = em.Mesh.start(tiny_checkpoint("qwen2moe"), context_shards=3, expert_groups=2, page_size=16)
    yield m
    m.shutdown()


def test_generate_from_many_threads_batches_and_matches_sequential(mesh):
    g = torch.Generator().manual_seed(0)
    context = torch.randint(0, VOCAB, (150,), generator=g).tolist()
    ctx = mesh.register_context(context)
    prompts = [torch.randint(0, VOCAB, (3 + i,), generator=g).tolist() for i in range(8)]
    # alternate: with the shared context, and without any context
    kwargs = [dict(context_id=ctx.id if i % 2 == 0 else None, max_new_tokens=12 + i) for i in range(8)]
    sequential = [mesh.generate(p, **kw).token_ids for p, kw in zip(prompts, kwargs)]
    steps_before = mesh.stats()["router"]["steps"]
    results = [None] * 8

    def run(i):
        results[i] = mesh.generate(prompts[i], **kwargs[i]).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    steps = mesh.stats()["router"]["steps"] - steps_before
    assert results == sequential
    total_tokens = sum(len(r) for r in results)
    assert steps < total_tokens  # requests shared steps (one step per token if run alone)
    mesh.drop_context(ctx.id)


def test_sampling_is_reproducible_with_a_seed(mesh):
    a = mesh.generate([1, 2, 3], max_new_tokens=10, temperature=0.9, top_p=0.9, seed=11)
    b = mesh.generate([1, 2, 3], max_new_tokens=10, temperature=0.9, top_p=0.9, seed=11)
    assert a.token_ids == b.token_ids
    assert len(a.token_ids) >= 1
