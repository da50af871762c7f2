"""Mesh.start never hangs: too few cluster resources or actors that do not come up fail within a
bound, name what is missing and leave nothing behind; a checkpoint with no tokenizer starts."""

import time

import pytest
import ray
import torch

import expertmesh as em

pytestmark = pytest.mark.ray


def mesh_actors() -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("mesh-")]


def test_too_few_resources_fail_at_once_naming_them(ray_cluster, tiny_checkpoint):
    before = mesh_actors()
    have = ray.cluster_resources()["context_shard"]
    t0 = time.perf_counter()
    with pytest.raises(em.PlacementError, match=rf"needs {int(have) + 1} `context_shard` .*of {have:g}"):
        em.Mesh.start(tiny_checkpoint("mixtral"), context_shards=int(have) + 1, expert_groups=2)
    assert time.perf_counter() - t0 < 5
    assert mesh_actors() == before


def test_actors_that_do_not_start_in_time_are_killed(ray_cluster, tiny_checkpoint):
    before = mesh_actors()
    with pytest.raises(em.PlacementError, match="did not start within"):
        em.Mesh.start(tiny_checkpoint("mixtral"), context_shards=2, expert_groups=2, start_timeout_s=0.001)
    deadline = time.time() + 10
    while mesh_actors() != before and time.time() < deadline:
        time.sleep(0.1)
    assert mesh_actors() == before


def test_checkpoint_without_tokenizer_serves_token_ids(ray_cluster, tmp_path):
    import transformers as tf

    cfg = tf.MixtralConfig(vocab_size=200, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                           intermediate_size=32, num_hidden_layers=1, num_local_experts=2, num_experts_per_tok=1,
                           max_position_embeddings=512, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    tf.MixtralForCausalLM(cfg).save_pretrained(str(tmp_path))
    with em.Mesh.start(str(tmp_path), context_shards=1, expert_groups=1) as mesh:
        ctx = mesh.register_context(list(range(3, 40)))
        res = mesh.generate([5, 6, 7], context_id=ctx.id, max_new_tokens=4)
        assert len(res.token_ids) == res.completion_tokens and res.text == ""
        with pytest.raises(em.NoTokenizer, match="no tokenizer is available.*vocabulary of 200"):
            mesh.tokenizer.encode("hello")
