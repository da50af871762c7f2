"""Mesh.start never hangs: too few cluster resources or actors that do not come up fail within a
bound, name what is missing and leave nothing behind; a checkpoint with no tokenizer starts."""

import time
from pathlib import Path

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


def test_the_layout_is_picked_from_the_hardware_where_none_is_named():
    from expertmesh.platform.layout import pick_layout

    cpu2 = pick_layout(None, None, None, {"CPU": 2})
    assert (cpu2.context_shards, cpu2.expert_groups, cpu2.colocate) == (1, 1, True)  # the router + one worker
    assert pick_layout(None, None, None, {"CPU": 16}).context_shards == 4  # one worker per 4 CPUs
    gpu = pick_layout(None, None, None, {"CPU": 96, "GPU": 8}, num_experts=64)
    assert (gpu.context_shards, gpu.expert_groups, gpu.colocate) == (8, 8, True)  # one worker per GPU
    assert pick_layout(None, None, None, {"CPU": 96, "GPU": 8}, num_experts=4).context_shards == 4
    # declared units bound it: a colocated worker takes one of each
    assert pick_layout(None, None, None, {"CPU": 64, "context_shard": 2, "expert_group": 3}).context_shards == 2
    named = pick_layout(3, None, None, {"CPU": 2})  # counts named: separate actors, the rest picked
    assert (named.context_shards, named.expert_groups, named.colocate) == (3, 1, False)
    assert pick_layout(2, 2, True, {"CPU": 2}).colocate
    with pytest.raises(ValueError, match=r"context_shards must be an integer >= 1 or None .*got 0"):
        pick_layout(0, None, None, {"CPU": 2})
    with pytest.raises(ValueError, match=r"expert_groups must be an integer >= 1 or None .*got 1.5"):
        pick_layout(None, 1.5, None, {"CPU": 2})


def test_a_mesh_started_with_no_layout_is_colocated_and_exact(ray_cluster, tiny_checkpoint):
    ckpt = tiny_checkpoint("mixtral")
    prompt = [5, 17, 42, 99, 7, 3]
    cpus = int(ray.cluster_resources()["CPU"])
    with em.Mesh.start(ckpt) as mesh:  # this cluster: no GPU
        assert mesh.colocated and len(mesh.shards) == len(mesh.groups) == max(1, cpus // 4)
        ctx = mesh.register_context(list(range(4, 300)), mode="exact")
        got = mesh.forward_logits(prompt, context_id=ctx.id)
    with em.Mesh.start(ckpt, context_shards=2, expert_groups=2) as mesh:
        assert not mesh.colocated and len(mesh.shards) == 2
        ctx = mesh.register_context(list(range(4, 300)), mode="exact")
        want = mesh.forward_logits(prompt, context_id=ctx.id)
        torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), rtol=0, atol=1e-5)


def test_a_mesh_spec_is_validated_once_with_the_numbers_in_its_messages():
    spec = em.MeshSpec(context_shards=2, expert_groups=2, page_size=16, device="cuda:0", store=Path("/x"))
    assert (spec.device, spec.store) == ("cuda:0", "/x")  # normalised once
    assert spec.replace(routers=2).routers == 2 and spec.routers == 1  # frozen: a changed copy
    for bad, match in (({"context_shards": 0}, "context_shards must be an integer >= 1 or None, got 0"),
                       ({"routers": True}, "routers must be an integer >= 1, got True"),
                       ({"kv_dtype": "fp8"}, "kv_dtype must be one of"), ({"data_plane": "nccl"}, "data_plane"),
                       ({"transport": "nccl", "device": "cpu"}, "does not fit device 'cpu'"),
                       ({"gpus_per_actor": 1.5}, "gpus_per_actor must be in"),
                       ({"shard_backend": "tpu"}, "shard_backend must be one of"),
                       ({"colocate": "yes"}, "colocate must be True, False or None")):
        with pytest.raises(ValueError, match=match):
            em.MeshSpec(**bad)
    with pytest.raises(TypeError, match="page_sizes"):  # an unknown field is refused by name
        em.Mesh.start(page_sizes=16)
    with pytest.raises(ValueError, match="not both"):
        em.Mesh.start(spec=spec, routers=2)
