"""Meshes whose context shards and/or expert groups compute with JAX (CPU build here)."""

import sys

import numpy as np
import pytest

import expertmesh as em
from tests.actors.test_mesh_parity import hf_logits, ids
from tests.conftest import ARCHS

pytest.importorskip("jax")
pytestmark = pytest.mark.ray
CONTEXT_LEN = 101


@pytest.mark.parametrize("arch", ARCHS)
def test_jax_mesh_logits_match_hf(ray_cluster, tiny_checkpoint, hf_model, arch):
    """All-JAX mesh: logits over an exact context equal Hugging Face's fp32 logits."""
    mesh = em.Mesh.start(tiny_checkpoint(arch), context_shards=2, expert_groups=2, page_size=16,
                         shard_backend="jax", expert_backend="jax")
    try:
        stats = mesh.stats()
        assert {s["backend"] for s in stats["shards"]} == {"jax"}
        assert {g["backend"] for g in stats["expert_groups"]} == {"jax"}
        context, prompt = ids(CONTEXT_LEN, 1), ids(9, 2)
        want = hf_logits(hf_model(arch), context + prompt)[-len(prompt):]
        ctx = mesh.register_context(context, mode="exact")
        assert np.abs(mesh.forward_logits(prompt, context_id=ctx.id) - want).max() <= 1e-4
    finally:
        mesh.shutdown()


def test_mixed_meshes_generate_the_torch_tokens(ray_cluster, tiny_checkpoint):
    """Llama-4 (chunked-local + global layers, NoPE, sigmoid routing with input scaling), exact
    and with Quest page selection (top_pages=3 of 4 pages per shard)."""
    arch, context, prompt = "llama4", ids(CONTEXT_LEN, 3), ids(6, 4)
    tokens = {}
    for shard_backend, expert_backend in (("torch", "torch"), ("jax", "torch"), ("torch", "jax")):
        mesh = em.Mesh.start(tiny_checkpoint(arch), context_shards=2, expert_groups=2, page_size=16,
                             shard_backend=shard_backend, expert_backend=expert_backend)
        try:
            ctx = mesh.register_context(context, mode="exact")
            res = [mesh.generate(prompt, context_id=ctx.id, max_new_tokens=12),
                   mesh.generate(prompt, context_id=ctx.id, max_new_tokens=12, top_pages=3)]
            tokens[shard_backend, expert_backend] = [r.token_ids for r in res]
        finally:
            mesh.shutdown()
    assert tokens["jax", "torch"] == tokens["torch", "torch"]
    assert tokens["torch", "jax"] == tokens["torch", "torch"]


@pytest.mark.parametrize("kw", [{"shard_backend": "tpu"}, {"expert_backend": "Jax"}])
def test_bad_backend_fails_at_start(tiny_checkpoint, kw):
    with pytest.raises(ValueError, match=r"must be one of \('torch', 'jax'\)"):
        em.Mesh.start(tiny_checkpoint("mixtral"), **kw)


def test_jax_missing_names_the_extra(tiny_checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "jax", None)  # `import jax` now fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'expertmesh\[jax\]'"):
        em.Mesh.start(tiny_checkpoint("mixtral"), expert_backend="jax")


def test_jax_shards_added_and_rebalanced_stay_exact(ray_cluster, tiny_checkpoint, tmp_path):
    """`add_shards` starts shards of the running ones' backend; a moved segment answers the same."""
    mesh = em.Mesh.start(tiny_checkpoint("mixtral"), context_shards=2, expert_groups=1, page_size=16,
                         shard_backend="jax", store=str(tmp_path / "store"))
    try:
        ctxs = [mesh.register_context(ids(CONTEXT_LEN, 5 + k), mode="exact") for k in range(2)]
        prompt = ids(6, 7)
        want = [mesh.forward_logits(prompt, context_id=c.id) for c in ctxs]
        assert mesh.add_shards(1) == [2]
        assert mesh.stats()["shards"][2]["backend"] == "jax"
        res = mesh.rebalance()
        assert [m["to"] for m in res["moved"]] == [2]
        for c, w in zip(ctxs, want):
            np.testing.assert_allclose(mesh.forward_logits(prompt, context_id=c.id), w, rtol=0, atol=1e-6)
    finally:
        mesh.shutdown()
