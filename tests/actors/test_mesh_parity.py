"""The mesh (real Ray actors) gives the logits and tokens of Hugging Face's reference."""

import numpy as np
import pytest
import torch

import expertmesh as em
from tests.conftest import ARCHS, VOCAB

GROUPS = {"mixtral": 3, "qwen2moe": 2, "qwen3moe": 1, "olmoe": 3, "llama4": 2, "gpt_oss": 2, "deepseek_v3": 3}
CONTEXT_LEN = 101  # not divisible by 2, 3 or 4 shards
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", params=ARCHS)
def arch_mesh(request, ray_cluster, tiny_checkpoint, hf_model):
    arch = request.param
    mesh = em.Mesh.start(tiny_checkpoint(arch), context_shards=4, expert_groups=GROUPS[arch], page_size=16)
    yield arch, mesh, hf_model(arch)
    mesh.shutdown()


def ids(n, seed):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_logits(hf, seq):
    with torch.no_grad():
        return hf(torch.tensor([seq])).logits[0].numpy()


def hf_generate(hf, seq, n=32):
    with torch.no_grad():
        out = hf.generate(torch.tensor([seq]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(seq):].tolist()


@pytest.mark.parametrize("shards", [1, 2, 3, 4])
def test_forward_logits_over_exact_context_match_hf(arch_mesh, shards):
    arch, mesh, hf = arch_mesh
    context, prompt = ids(CONTEXT_LEN, 1), ids(9, 2)
    ctx = mesh.register_context(context, mode="exact", shards=shards)
    try:
        assert len(ctx.shards) == shards and ctx.num_tokens == CONTEXT_LEN
        logits = mesh.forward_logits(prompt, context_id=ctx.id)
        assert logits.shape == (len(prompt), VOCAB)
        assert np.abs(logits - hf_logits(hf, context + prompt)[-len(prompt):]).max() <= 1e-4
    finally:
        mesh.drop_context(ctx.id)


def test_greedy_generate_matches_hf_with_and_without_context(arch_mesh):
    arch, mesh, hf = arch_mesh
    context, prompt = ids(CONTEXT_LEN, 3), ids(6, 4)
    ctx = mesh.register_context(context, mode="exact", shards=3)
    try:
        res = mesh.generate(prompt, context_id=ctx.id, max_new_tokens=32)
        assert res.token_ids == hf_generate(hf, context + prompt)
        assert res.context_tokens == CONTEXT_LEN and res.prompt_tokens == len(prompt)
        assert set(res.pathway["shards"]) <= set(ctx.shards)
        assert sum(res.pathway["expert_group_tokens"].values()) > 0
    finally:
        mesh.drop_context(ctx.id)
    plain = mesh.generate(prompt, max_new_tokens=32)
    assert plain.token_ids == hf_generate(hf, prompt)
    assert np.abs(mesh.forward_logits(prompt) - hf_logits(hf, prompt)).max() <= 1e-4


def test_logprobs_over_a_context_equal_hf(arch_mesh):
    """Log-probabilities of the prompt's tokens (echo's) and of the generated ones, over a registered
    context, equal Hugging Face's log_softmax over context + prompt + output."""
    from expertmesh.model.sampling import SamplingParams

    arch, mesh, hf = arch_mesh
    context, prompt = ids(CONTEXT_LEN, 7), ids(6, 8)
    ctx = mesh.register_context(context, mode="exact", shards=3)
    try:
        res = mesh.generate(prompt, context_id=ctx.id, params=SamplingParams(4, logprobs=2, prompt_logprobs=2))
    finally:
        mesh.drop_context(ctx.id)
    seq = context + prompt + res.token_ids
    ref = torch.log_softmax(torch.as_tensor(hf_logits(hf, seq)), dim=-1).numpy()
    start = len(context)
    assert res.prompt_logprobs[0] is None and len(res.prompt_logprobs) == len(prompt)
    for i, entry in enumerate(res.prompt_logprobs[1:], 1):  # row start+i-1 predicts prompt[i]
        assert entry.token_id == prompt[i] and abs(entry.logprob - ref[start + i - 1, prompt[i]]) <= 1e-4
        assert [t for t, _ in entry.top] == list(np.argsort(-ref[start + i - 1])[:2])
    for j, entry in enumerate(res.logprobs):
        row = ref[start + len(prompt) - 1 + j]
        assert entry.token_id == res.token_ids[j] == int(row.argmax()) and abs(entry.logprob - row.max()) <= 1e-4


def test_top_shards_all_is_exact_and_fewer_reports_the_shards_visited(arch_mesh):
    arch, mesh, hf = arch_mesh
    context, prompt = ids(CONTEXT_LEN, 5), ids(5, 6)
    ctx = mesh.register_context(context, mode="exact", shards=4)
    try:
        full = mesh.forward_logits(prompt, context_id=ctx.id)
        assert np.array_equal(mesh.forward_logits(prompt, context_id=ctx.id, top_shards=4), full)
        res = mesh.generate(prompt, context_id=ctx.id, max_new_tokens=4, top_shards=2)
        per_layer = res.pathway["shards_per_layer"]
        global_layers = [i for i, c in enumerate(mesh.config.chunk_size) if c is None]
        for i in global_layers:
            assert len(per_layer[i]) == 2
        visited = {s["index"] for s in mesh.stats()["shards"] if res.request_id in s["visits"]}
        assert visited == set(res.pathway["shards"])
        assert visited <= {s for layer in per_layer for s in layer}
    finally:
        mesh.drop_context(ctx.id)


def test_blockwise_single_shard_equals_exact(arch_mesh):
    arch, mesh, hf = arch_mesh
    context, prompt = ids(CONTEXT_LEN, 7), ids(4, 8)
    a = mesh.register_context(context, mode="exact", shards=1)
    b = mesh.register_context(context, mode="blockwise", shards=1)
    try:
        assert np.array_equal(mesh.forward_logits(prompt, context_id=a.id),
                              mesh.forward_logits(prompt, context_id=b.id))
    finally:
        mesh.drop_context(a.id)
        mesh.drop_context(b.id)


def test_llama4_blockwise_on_four_shards_matches_hf(arch_mesh):
    """Llama-4: segments that start on chunk boundaries, encoded each on its own (blockwise),
    give Hugging Face's logits, because the only global (NoPE) layer is the last one."""
    arch, mesh, hf = arch_mesh
    if arch != "llama4":
        pytest.skip("the blockwise-is-exact claim is Llama-4's (chunked-local layers before the global one)")
    chunk = hf.config.attention_chunk_size
    assert mesh.config.chunk_size[-1] is None and all(mesh.config.chunk_size[:-1])  # local, ..., global
    context, prompt = ids(CONTEXT_LEN, 9), ids(7, 10)
    ctx = mesh.register_context(context, mode="blockwise", shards=4)
    try:
        assert len(ctx.shards) == 4
        # segment lengths in shard order (segments are contiguous): every boundary on a chunk boundary
        lengths = [s["contexts"][ctx.id] for s in mesh.stats()["shards"] if ctx.id in s["contexts"]]
        assert len(lengths) == 4 and sum(lengths) == CONTEXT_LEN
        assert all(n % chunk == 0 for n in lengths[:-1]), (lengths, chunk)
        got = mesh.forward_logits(prompt, context_id=ctx.id)
        assert np.abs(got - hf_logits(hf, context + prompt)[-len(prompt):]).max() <= 1e-4
        res = mesh.generate(prompt, context_id=ctx.id, max_new_tokens=8)
        assert res.token_ids == hf_generate(hf, context + prompt, 8)
    finally:
        mesh.drop_context(ctx.id)


def test_mixtral_sliding_window_across_shards_matches_hf(ray_cluster, tiny_checkpoint, tmp_path):
    """A sliding window (16) that reaches back over a shard boundary: the mesh gives HF's logits."""
    import json
    import shutil
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    path = tmp_path / "mixtral-window"
    shutil.copytree(tiny_checkpoint("mixtral"), path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(cfg, sliding_window=16)))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    context, prompt = ids(CONTEXT_LEN, 11), ids(7, 12)
    mesh = em.Mesh.start(str(path), context_shards=4, expert_groups=2, page_size=16)
    try:
        ctx = mesh.register_context(context, mode="exact", shards=4)
        got = mesh.forward_logits(prompt, context_id=ctx.id)
        assert np.abs(got - hf_logits(hf, context + prompt)[-len(prompt):]).max() <= 1e-4
        assert mesh.generate(prompt, context_id=ctx.id, max_new_tokens=8).token_ids == \
            hf_generate(hf, context + prompt, 8)
    finally:
        mesh.shutdown()
