"""The collective data plane (no Ray call per step or layer; per-layer tensors over TCP
sockets on CPU, or a gloo process group) gives exactly what the Ray-task path gives, separate
or colocated; a killed member does not wedge the mesh; bad device/dtype/transport values fail
clearly at start."""

import os
import time

import numpy as np
import pytest
import ray
import torch

import expertmesh as em
from expertmesh.engine.request import Request
from expertmesh.model.sampling import SamplingParams
from tests.conftest import ARCHS, VOCAB

GROUPS = {"mixtral": 3, "qwen2moe": 2, "qwen3moe": 1, "olmoe": 3, "llama4": 2, "gpt_oss": 2, "deepseek_v3": 3}
pytestmark = pytest.mark.ray


def ids(n, seed):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", params=ARCHS)
def meshes(request, ray_cluster, tiny_checkpoint):
    arch = request.param
    ckpt = tiny_checkpoint(arch)
    started = {
        "ray": em.Mesh.start(ckpt, context_shards=3, expert_groups=GROUPS[arch], page_size=16, data_plane="ray"),
        "collective": em.Mesh.start(ckpt, context_shards=3, expert_groups=GROUPS[arch], page_size=16),
        "colocated": em.Mesh.start(ckpt, context_shards=3, expert_groups=GROUPS[arch], page_size=16, colocate=True),
        "micro": em.Mesh.start(ckpt, context_shards=3, expert_groups=GROUPS[arch], page_size=16, colocate=True,
                               micro_batches=2),  # a step's requests as two halves in ping-pong
    }
    if arch in ("mixtral", "llama4"):  # the torch.distributed transport on CPU (NCCL shares its code)
        started["gloo"] = em.Mesh.start(ckpt, context_shards=3, expert_groups=GROUPS[arch], page_size=16,
                                        transport="gloo")
    yield arch, started
    for mesh in started.values():
        mesh.shutdown()


def test_collective_and_colocated_equal_the_ray_task_path(meshes):
    arch, m = meshes
    context, prompt = ids(77, 11), ids(7, 12)
    logits, tokens, pathways = {}, {}, {}
    for name, mesh in m.items():
        ctx = mesh.register_context(context, mode="exact")
        try:
            logits[name] = mesh.forward_logits(prompt, context_id=ctx.id)
            res = mesh.generate(prompt, context_id=ctx.id, max_new_tokens=12)
            tokens[name], pathways[name] = res.token_ids, res.pathway
            # a batch of concurrent requests with top_pages and top_shards choices
            batch = [mesh.router.generate.remote(Request(ids(5, 20 + i), ctx.id, SamplingParams(6),
                                                         top_shards=2 if i % 2 else None,
                                                         top_pages=2 if i % 3 == 0 else None)) for i in range(6)]
            tokens[name + "/batch"] = [r.token_ids for r in ray.get(batch)]
            together = [mesh.router.forward_logits.remote(Request(ids(3 + i, 40 + i), ctx.id)) for i in range(4)]
            logits[name + "/batch"] = [np.asarray(r) for r in ray.get(together)]
        finally:
            mesh.drop_context(ctx.id)
    for name in set(m) - {"ray"}:
        assert np.array_equal(logits[name], logits["ray"]), (arch, name, np.abs(logits[name] - logits["ray"]).max())
        assert tokens[name] == tokens["ray"] and tokens[name + "/batch"] == tokens["ray/batch"]
        for got, want in zip(logits[name + "/batch"], logits["ray/batch"]):  # batched as the requests met:
            assert np.abs(got - want).max() <= 1e-5, (arch, name, np.abs(got - want).max())  # last bits differ
        assert pathways[name]["shards_per_layer"] == pathways["ray"]["shards_per_layer"]
        assert pathways[name]["pages"] == pathways["ray"]["pages"]
        assert pathways[name]["expert_group_tokens"] == pathways["ray"]["expert_group_tokens"]
    assert ray.get(m["micro"].router.stats.remote())["micro_batched_steps"] > 0  # the halves ran


def test_no_ray_call_per_step_or_layer(meshes):
    arch, m = meshes
    for name in set(m) - {"ray"}:
        mesh = m[name]
        ctx = mesh.register_context(ids(40, 3), mode="exact", shards=len(mesh.shards))
        before = [ray.get(s.stats.remote()) for s in mesh.shards]
        steps0 = ray.get(mesh.router.stats.remote())["steps"]
        try:
            mesh.generate(ids(4, 4), context_id=ctx.id, max_new_tokens=8)
        finally:
            mesh.drop_context(ctx.id)
        stats = ray.get(mesh.router.stats.remote())
        assert stats["data_plane"] == "collective" and stats["process_groups_formed"] >= 1
        assert stats["transport"] == ("gloo" if name == "gloo" else "socket")
        steps = stats["steps"] - steps0
        after = [ray.get(s.stats.remote()) for s in mesh.shards]
        served = sum(a["steps_served"] - b["steps_served"] for a, b in zip(after, before))
        attends = sum(a["calls"] - b["calls"] for a, b in zip(after, before))
        # the shards served steps through their step loops (plans over the group, no Ray call),
        # attending once per layer of each step they took part in. A worker with nothing to do in a
        # step hears its plan with its next message (collective.py: held), so the bound is over the
        # mesh's whole life, not this interval
        assert served >= 1 and steps >= 1
        assert sum(a["steps_served"] for a in after) <= stats["steps"] * len(mesh.shards), (name, served, steps)
        assert attends >= served and (attends > served or arch == "llama4")
    ray_mesh = m["ray"]  # the Ray-task path serves no step loop
    assert all(ray.get(s.stats.remote())["steps_served"] == 0 for s in ray_mesh.shards)


def test_killed_worker_restarts_and_the_mesh_serves_again(ray_cluster, tiny_checkpoint):
    mesh = em.Mesh.start(tiny_checkpoint("mixtral"), context_shards=2, expert_groups=2, page_size=16,
                         colocate=True, store=None)
    try:
        prompt = ids(6, 7)
        want = mesh.generate(prompt, max_new_tokens=8).token_ids
        formed = ray.get(mesh.router.stats.remote())["process_groups_formed"]
        pid = ray.get(mesh.groups[1].__ray_call__.remote(lambda self: os.getpid()))
        ray.kill(mesh.groups[1], no_restart=False)  # worker 1: shard 1 and expert group 1
        gone_by = time.monotonic() + 30  # ray.kill returns before the process is gone
        while time.monotonic() < gone_by and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.01)
        assert not os.path.exists(f"/proc/{pid}"), "the killed worker's process did not exit"
        t0 = time.monotonic()
        got = mesh.generate(prompt, max_new_tokens=8).token_ids  # no context: only the experts matter
        assert got == want
        assert time.monotonic() - t0 < 60
        assert ray.get(mesh.router.stats.remote())["process_groups_formed"] > formed
        assert mesh.generate(prompt, max_new_tokens=8).token_ids == want  # and keeps serving
    finally:
        mesh.shutdown()


def test_micro_batched_steps_with_messages_larger_than_socket_buffers(ray_cluster, tiny_checkpoint):
    """Halves of thousands of rows, separate shards and expert groups: each connection carries
    one request at a time (two outstanding would each wait on the other's full buffer: a
    deadlock until the step timeout), and the logits equal one request at a time."""
    mesh = em.Mesh.start(tiny_checkpoint("mixtral"), context_shards=2, expert_groups=2, page_size=16,
                         micro_batches=2)
    try:
        prompts = [ids(600, 80 + i) for i in range(8)]  # a half: ~2,400 rows, >1 MB of expert rows a layer
        want = [mesh.forward_logits(p) for p in prompts]
        before = ray.get(mesh.router.stats.remote())["micro_batched_steps"]
        got = ray.get([mesh.router.forward_logits.remote(Request(p)) for p in prompts], timeout=60)
        assert ray.get(mesh.router.stats.remote())["micro_batched_steps"] > before
        for g, w in zip(got, want):
            assert np.abs(np.asarray(g) - w).max() <= 1e-5
    finally:
        mesh.shutdown()


def test_worker_killed_under_micro_batched_steps(ray_cluster, tiny_checkpoint):
    """Two halves in ping-pong when a worker dies mid-step: the failing half stops the other, the
    step's actors are released, the group forms again and every request completes unchanged."""
    mesh = em.Mesh.start(tiny_checkpoint("mixtral"), context_shards=2, expert_groups=2, page_size=16,
                         colocate=True, micro_batches=2)
    try:
        prompts = [ids(5, 60 + i) for i in range(6)]
        requests = [Request(p, params=SamplingParams(40)) for p in prompts]
        want = [r.token_ids for r in ray.get([mesh.router.generate.remote(r) for r in requests])]
        before = ray.get(mesh.router.stats.remote())
        assert before["micro_batched_steps"] > 0
        refs = [mesh.router.generate.remote(r) for r in requests]
        time.sleep(0.3)
        assert len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) < len(refs)  # mid-stream
        ray.kill(mesh.groups[1], no_restart=False)
        got = [r.token_ids for r in ray.get(refs, timeout=120)]
        assert got == want
        after = ray.get(mesh.router.stats.remote())
        assert after["process_groups_formed"] > before["process_groups_formed"]
        assert [r.token_ids for r in ray.get([mesh.router.generate.remote(r) for r in requests])] == want
    finally:
        mesh.shutdown()


def test_bad_device_and_dtype_name_the_accepted_values(ray_cluster, tiny_checkpoint):
    with pytest.raises(ValueError, match="auto.*cpu.*cuda"):
        em.Mesh.start(tiny_checkpoint("olmoe"), context_shards=1, expert_groups=1, device="tpu")
    with pytest.raises(ValueError, match="float32.*bfloat16.*float16"):
        em.Mesh.start(tiny_checkpoint("olmoe"), context_shards=1, expert_groups=1, dtype="fp8")
    with pytest.raises(ValueError, match="collective.*ray"):
        em.Mesh.start(tiny_checkpoint("olmoe"), context_shards=1, expert_groups=1, data_plane="nccl")
    with pytest.raises(ValueError, match="auto.*socket.*gloo.*nccl"):
        em.Mesh.start(tiny_checkpoint("olmoe"), context_shards=1, expert_groups=1, transport="tcp")
    with pytest.raises(ValueError, match="NCCL moves GPU tensors"):
        em.Mesh.start(tiny_checkpoint("olmoe"), context_shards=1, expert_groups=1, device="cpu", transport="nccl")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_without_a_gpu_fails_at_start_not_a_hang(ray_cluster, tiny_checkpoint):
    t0 = time.monotonic()
    with pytest.raises(em.DeviceError, match="no GPU"):
        em.Mesh.start(tiny_checkpoint("olmoe"), context_shards=1, expert_groups=1, device="cuda")
    assert time.monotonic() - t0 < 10


def test_bfloat16_mesh_against_hf_bfloat16(ray_cluster, tiny_checkpoint):
    """bf16 on CPU: the mesh (attention split over shards, merged in fp32) stays as close to
    Hugging Face's own bf16 forward as the single-process model does (tests/model), and greedy
    tokens agree."""
    from transformers import AutoModelForCausalLM

    ckpt = tiny_checkpoint("qwen2moe")
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    mesh = em.Mesh.start(ckpt, context_shards=2, expert_groups=2, page_size=16, dtype="bfloat16")
    try:
        context, prompt = ids(50, 31), ids(6, 32)
        ctx = mesh.register_context(context, mode="exact")
        got = mesh.forward_logits(prompt, context_id=ctx.id)
        with torch.no_grad():
            ref = hf(torch.tensor([context + prompt])).logits[0, -len(prompt):].float().numpy()
        rel = np.abs(got - ref).max() / np.abs(ref).max()
        assert rel <= 0.08, rel
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.8
        stats = mesh.stats()
        assert stats["router"]["dtype"] == "bfloat16" and all(g["dtype"] == "bfloat16" for g in stats["expert_groups"])
    finally:
        mesh.shutdown()
