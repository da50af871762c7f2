"""The mesh (real Ray actors, several context shards) is exact against Hugging Face with RoPE
scaling, over contexts longer than the original context the scaling stretches, in exact and
(Llama-4's chunked layers) blockwise registration, and after a restart on its store."""

import numpy as np
import pytest
import torch

import expertmesh as em
from tests.conftest import VOCAB
from tests.model.test_rope_scaling import ORIGINAL, build_scaled

pytestmark = pytest.mark.ray
CONTEXT = 181  # past ORIGINAL (64) and not a multiple of the shard count


def ids(n, seed):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("arch,scaling,mode", [("llama4", "llama3", "blockwise"), ("qwen3moe", "yarn", "exact"),
                                               ("mixtral", "yarn-mscale", "exact")])
def test_scaled_rope_over_shards_matches_hf(ray_cluster, tmp_path, arch, scaling, mode):
    from transformers import AutoModelForCausalLM

    path = build_scaled(arch, scaling, tmp_path / "ckpt")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    context, prompt = ids(CONTEXT, 1), ids(7, 2)
    with torch.no_grad():
        ref = hf(torch.tensor([context + prompt])).logits[0, -len(prompt):].numpy()
        want = []  # greedy over Hugging Face's full forward (its cached generate for Llama-4 with a
        for _ in range(12):  # 128-token chunk disagrees with its own forward here)
            want.append(int(hf(torch.tensor([context + prompt + want])).logits[0, -1].argmax()))
    store = str(tmp_path / "store")
    mesh = em.Mesh.start(path, context_shards=3, expert_groups=2, page_size=16, store=store)
    try:
        ctx = mesh.register_context(context, mode=mode, shards=3)
        logits = mesh.forward_logits(prompt, context_id=ctx.id)
        assert np.abs(logits - ref).max() <= 1e-4, np.abs(logits - ref).max()
        assert mesh.generate(prompt, context_id=ctx.id, max_new_tokens=12).token_ids == want
    finally:
        mesh.shutdown()
    again = em.Mesh.start(path, context_shards=3, expert_groups=2, page_size=16, store=store)
    try:  # a new mesh on the same store: the stored (rotated) keys give the same logits, bit for bit
        assert np.array_equal(again.forward_logits(prompt, context_id=ctx.id), logits)
    finally:
        again.shutdown()
    assert ORIGINAL < CONTEXT
