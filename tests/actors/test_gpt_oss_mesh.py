"""GPT-OSS on the mesh (real Ray actors): exact against Hugging Face over a context longer than
the sliding window and the original YaRN context, split over three shards; the sinks are added
once at the router whatever the number of shards; a restart on the store gives the same logits
bit for bit; Quest page selection (`top_pages`) runs on its layers."""

import numpy as np
import pytest
import torch

import expertmesh as em
from tests.conftest import VOCAB

pytestmark = pytest.mark.ray
CONTEXT = 203  # > window (24) and > original_max_position_embeddings (64); not a multiple of 3


def ids(n, seed):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_gpt_oss_over_shards_matches_hf_and_restarts_on_its_store(ray_cluster, tmp_path, tiny_checkpoint, hf_model):
    path, hf = tiny_checkpoint("gpt_oss"), hf_model("gpt_oss")
    context, prompt = ids(CONTEXT, 1), ids(7, 2)
    with torch.no_grad():
        ref = hf(torch.tensor([context + prompt])).logits[0, -len(prompt):].numpy()
        want = []
        for _ in range(10):
            want.append(int(hf(torch.tensor([context + prompt + want])).logits[0, -1].argmax()))
    store = str(tmp_path / "store")
    mesh = em.Mesh.start(path, context_shards=3, expert_groups=2, page_size=16, store=store)
    try:
        for shards in (1, 3):
            ctx = mesh.register_context(context, mode="exact", shards=shards)
            logits = mesh.forward_logits(prompt, context_id=ctx.id)
            assert np.abs(logits - ref).max() <= 1e-4, (shards, np.abs(logits - ref).max())
        assert mesh.generate(prompt, context_id=ctx.id, max_new_tokens=10).token_ids == want
        sparse = mesh.generate(prompt, context_id=ctx.id, max_new_tokens=10, top_pages=2)
        assert len(sparse.token_ids) == 10 and sparse.pathway["pages"]
    finally:
        mesh.shutdown()
    again = em.Mesh.start(path, context_shards=3, expert_groups=2, page_size=16, store=store)
    try:
        assert np.array_equal(again.forward_logits(prompt, context_id=ctx.id), logits)
    finally:
        again.shutdown()
