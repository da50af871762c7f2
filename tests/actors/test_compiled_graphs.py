"""The compiled-graph transport (Mesh.start(compiled_graphs=True)) gives the same results."""

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import expertmesh as em
from tests.conftest import VOCAB

CONTEXT_LEN = 101
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", params=["mixtral", "qwen2moe"])
def cg_mesh(request, ray_cluster, tiny_checkpoint, hf_model):
    arch = request.param
    mesh = em.Mesh.start(tiny_checkpoint(arch), context_shards=4, expert_groups=2, page_size=16,
                         compiled_graphs=True)
    yield arch, mesh, hf_model(arch)
    mesh.shutdown()


def ids(n, seed):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_generate(hf, seq, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([seq]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(seq):].tolist()


def test_forward_logits_over_exact_context_match_hf(cg_mesh):
    arch, mesh, hf = cg_mesh
    context, prompt = ids(CONTEXT_LEN, 11), ids(9, 12)
    ctx = mesh.register_context(context, mode="exact", shards=3)
    try:
        logits = mesh.forward_logits(prompt, context_id=ctx.id)
        with torch.no_grad():
            ref = hf(torch.tensor([context + prompt])).logits[0, -len(prompt):].numpy()
            plain = hf(torch.tensor([prompt])).logits[0].numpy()
        assert np.abs(logits - ref).max() <= 1e-4
        assert np.abs(mesh.forward_logits(prompt) - plain).max() <= 1e-4
    finally:
        mesh.drop_context(ctx.id)


def test_greedy_generate_matches_the_plain_transport(cg_mesh, tiny_checkpoint):
    arch, mesh, hf = cg_mesh
    context, prompt = ids(CONTEXT_LEN, 13), ids(6, 14)
    plain = em.Mesh.start(tiny_checkpoint(arch), context_shards=4, expert_groups=2, page_size=16)
    try:
        results = []
        for m in (mesh, plain):
            ctx = m.register_context(context, mode="exact", shards=3)
            try:
                results.append(m.generate(prompt, context_id=ctx.id, max_new_tokens=24))
            finally:
                m.drop_context(ctx.id)
    finally:
        plain.shutdown()
    cg, ref = results
    assert cg.token_ids == ref.token_ids == hf_generate(hf, context + prompt, 24)
    assert cg.pathway["shards"] == ref.pathway["shards"]
    assert cg.pathway["expert_group_tokens"] == ref.pathway["expert_group_tokens"]


def test_concurrent_generate_from_8_threads(cg_mesh):
    arch, mesh, hf = cg_mesh
    context = ids(CONTEXT_LEN, 15)
    prompts = [ids(3 + i, 20 + i) for i in range(8)]
    ctx = mesh.register_context(context, mode="blockwise", shards=3)
    try:
        exact = mesh.register_context(context, mode="exact", shards=3)
        try:
            with ThreadPoolExecutor(8) as pool:
                outs = list(pool.map(lambda i: mesh.generate(prompts[i], context_id=exact.id if i % 2 else None,
                                                             max_new_tokens=12), range(8)))
        finally:
            mesh.drop_context(exact.id)
    finally:
        mesh.drop_context(ctx.id)
    for i, (p, res) in enumerate(zip(prompts, outs)):
        assert res.token_ids == hf_generate(hf, (context if i % 2 else []) + p, 12), i
    visited = {s["index"] for s in mesh.stats()["shards"] if outs[1].request_id in s["visits"]}
    assert visited == set(outs[1].pathway["shards"])


def test_shutdown_tears_down_the_graphs_quickly(ray_cluster, tiny_checkpoint):
    mesh = em.Mesh.start(tiny_checkpoint("mixtral"), context_shards=2, expert_groups=1, page_size=16,
                         compiled_graphs=True)
    ctx = mesh.register_context(ids(40, 30), shards=2)
    assert len(mesh.generate(ids(4, 31), context_id=ctx.id, max_new_tokens=3).token_ids) == 3
    t0 = time.perf_counter()
    mesh.shutdown()
    assert time.perf_counter() - t0 < 10
