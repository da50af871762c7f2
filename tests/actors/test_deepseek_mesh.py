"""DeepSeek-V3 on the mesh (real Ray actors): latent pages over three shards are exact against
Hugging Face's expanded attention past the original YaRN context; the store holds the latent
only (no V tensor, the bytes `segment_bytes` gives); a restart on the store gives the same
logits bit for bit; Quest page selection runs over latent summaries."""

from pathlib import Path

import numpy as np
import pytest
import torch

import expertmesh as em
from expertmesh.store.pages import SegmentFile, segment_bytes
from tests.conftest import VOCAB

pytestmark = pytest.mark.ray
CONTEXT = 203  # > original_max_position_embeddings (64); not a multiple of 3


def ids(n, seed):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_latent_pool_over_shards_matches_hf_and_restarts_on_its_store(ray_cluster, tmp_path, tiny_checkpoint,
                                                                     hf_model):
    path, hf = tiny_checkpoint("deepseek_v3"), hf_model("deepseek_v3")
    context, prompt = ids(CONTEXT, 1), ids(7, 2)
    with torch.no_grad():
        ref = hf(torch.tensor([context + prompt])).logits[0, -len(prompt):].numpy()
        want = hf.generate(torch.tensor([context + prompt]), max_new_tokens=10, do_sample=False,
                           pad_token_id=0)[0, CONTEXT + len(prompt):].tolist()
    store = tmp_path / "store"
    mesh = em.Mesh.start(path, context_shards=3, expert_groups=3, page_size=16, store=str(store))
    try:
        ctx = mesh.register_context(context, mode="exact", shards=3)
        logits = mesh.forward_logits(prompt, context_id=ctx.id)
        assert np.abs(logits - ref).max() <= 1e-4, np.abs(logits - ref).max()
        assert mesh.generate(prompt, context_id=ctx.id, max_new_tokens=10).token_ids == want
        sparse = mesh.generate(prompt, context_id=ctx.id, max_new_tokens=10, top_pages=2)
        assert len(sparse.token_ids) == 10 and sparse.pathway["pages"]
    finally:
        mesh.shutdown()
    files = sorted(Path(store).rglob("*.kv"))
    assert len(files) == 3
    for file in files:  # one latent vector per token and layer on disk: 3 layers x 40 values
        seg = SegmentFile.open(file)
        assert seg.shape.latent and (seg.shape.heads, seg.shape.head_dim) == (1, 40)
        assert seg.nbytes == segment_bytes(seg.shape)
        seg.close()
    again = em.Mesh.start(path, context_shards=3, expert_groups=3, page_size=16, store=str(store))
    try:
        assert np.array_equal(again.forward_logits(prompt, context_id=ctx.id), logits)
    finally:
        again.shutdown()
