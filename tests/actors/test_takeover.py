"""A lost context shard with a store: the shards that are running serve its segments from the
store (takeover.py), exactly, until Ray reports it alive again; then it takes them back."""

import os
import time

import numpy as np
import psutil
import pytest
import ray

import expertmesh as em
from expertmesh.dataplane.liveness import actor_state
from tests.faults import chunk_tokens, greedy_stream

pytestmark = pytest.mark.ray
PROMPT = [5, 17, 42, 99, 7, 3]
NEW = 24


def held(mesh):
    """Context ids (aliases included) each shard serves; a shard that does not answer: None."""
    out = []
    for s in mesh.shards:
        try:
            out.append(sorted(ray.get(s.contexts.remote(), timeout=5)))
        except Exception:  # noqa: BLE001 - dead
            out.append(None)
    return out


def kill_for_good(handle, within=20.0):
    """Kill an actor without restart and wait until Ray reports it DEAD and its process is gone:
    `ray.kill` only sends the kill, and Ray may report the actor DEAD a moment before its process
    has ended (meanwhile it still answers on the data plane, which does not go through Ray)."""
    pid = ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=within)
    ray.kill(handle, no_restart=True)
    deadline = time.monotonic() + within
    while actor_state(handle) != "DEAD" or _running(pid):
        assert time.monotonic() < deadline, f"actor still {actor_state(handle)} {within} s after its kill"
        time.sleep(0.05)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stream_killing(mesh, context_id, victim):
    """Greedy tokens of a stream over the context whose `victim` is killed (Ray restarts it)
    after the first tokens; and when the kill was made (perf_counter)."""
    gen = greedy_stream(mesh.router, PROMPT, context_id, NEW)
    got = chunk_tokens(ray.get(next(gen)))
    ray.kill(victim, no_restart=False)
    t0 = time.perf_counter()
    for ref in gen:
        got += chunk_tokens(ray.get(ref))
    return got, t0


def test_a_dead_shards_segments_are_served_by_the_others_exactly(ray_cluster, tiny_checkpoint, tmp_path):
    mesh = em.Mesh.start(tiny_checkpoint("mixtral"), context_shards=3, expert_groups=2, page_size=16,
                         store=str(tmp_path / "store"))
    try:
        ctx = mesh.register_context(list(range(4, 300)), mode="exact")
        assert ctx.shards == (0, 1, 2)
        want = mesh.forward_logits(PROMPT, context_id=ctx.id)
        tokens = mesh.generate(PROMPT, context_id=ctx.id, max_new_tokens=NEW).token_ids
        kill_for_good(mesh.shards[1])  # its host gone for good
        t0 = time.monotonic()
        got = mesh.forward_logits(PROMPT, context_id=ctx.id)
        took = time.monotonic() - t0
        print(f"\nTAKEOVER dead shard: answered again after {took:.2f} s, max |diff| {np.abs(got - want).max():.2e}")
        assert took < 10
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        res = mesh.generate(PROMPT, context_id=ctx.id, max_new_tokens=NEW)
        assert res.token_ids == tokens
        assert res.pathway["shards"] == [0, 1, 2]  # pathways name the segments, whoever serves them
        stand_in = [h for h in held(mesh) if h and f"{ctx.id}@1" in h]
        assert len(stand_in) == 1
        new = mesh.register_context(list(range(50, 150)), mode="exact")  # new contexts: the running shards
        assert new.shards == (0, 2)
        mesh.drop_context(ctx.id)  # the stand-in's alias goes with the context
        assert not any(h and any(c.startswith(ctx.id) for c in h) for h in held(mesh))
        mesh.drop_context(new.id)
    finally:
        mesh.shutdown()


def test_a_restarting_shard_is_stood_in_for_then_takes_its_segments_back(ray_cluster, tiny_checkpoint, tmp_path):
    mesh = em.Mesh.start(tiny_checkpoint("mixtral"), context_shards=2, expert_groups=2, page_size=16,
                         store=str(tmp_path / "store"))
    try:
        ctx = mesh.register_context(list(range(4, 260)), mode="exact")
        want = mesh.forward_logits(PROMPT, context_id=ctx.id)
        tokens = mesh.generate(PROMPT, context_id=ctx.id, max_new_tokens=NEW).token_ids
        got, t0 = stream_killing(mesh, ctx.id, mesh.shards[1])  # Ray restarts it; the stream must not notice
        print(f"\nTAKEOVER restarting shard: stream done {time.perf_counter() - t0:.2f} s after the kill")
        assert got == tokens
        deadline = time.monotonic() + 60  # back: Ray reports it alive, it rejoins, the alias is dropped
        while time.monotonic() < deadline:
            np.testing.assert_allclose(mesh.forward_logits(PROMPT, context_id=ctx.id), want, rtol=0, atol=1e-5)
            h = held(mesh)
            if h[1] is not None and ctx.id in h[1] and f"{ctx.id}@1" not in (h[0] or []):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"shard 1 did not take its segment back: {held(mesh)}")
        print(f"TAKEOVER restarting shard: segment handed back {time.perf_counter() - t0:.2f} s after the kill")
        assert mesh.generate(PROMPT, context_id=ctx.id, max_new_tokens=NEW).token_ids == tokens
    finally:
        mesh.shutdown()


def test_a_lost_expert_groups_experts_are_loaded_by_another_then_handed_back(ray_cluster, tiny_checkpoint,
                                                                             tmp_path):
    mesh = em.Mesh.start(tiny_checkpoint("mixtral"), context_shards=2, expert_groups=3, page_size=16)
    try:
        ctx = mesh.register_context(list(range(4, 200)), mode="exact")
        want = mesh.forward_logits(PROMPT, context_id=ctx.id)
        tokens = mesh.generate(PROMPT, context_id=ctx.id, max_new_tokens=NEW).token_ids
        got, t0 = stream_killing(mesh, ctx.id, mesh.groups[2])  # meanwhile another group holds its experts
        print(f"\nTAKEOVER restarting expert group: stream done {time.perf_counter() - t0:.2f} s after the kill")
        assert got == tokens
        np.testing.assert_allclose(mesh.forward_logits(PROMPT, context_id=ctx.id), want, rtol=0, atol=1e-5)
        deadline = time.monotonic() + 60  # back: it rejoins and the stand-in lets the experts go
        while time.monotonic() < deadline:
            mesh.generate(PROMPT, max_new_tokens=2)
            adopted = [ray.get(g.stats.remote())["adopted_experts"] for g in mesh.groups[:2]]
            if not any(adopted):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"the stand-in group still holds the experts: {adopted}")
        kill_for_good(mesh.groups[1])  # gone for good: group 0 or 2 holds its experts from now on
        t0 = time.perf_counter()
        np.testing.assert_allclose(mesh.forward_logits(PROMPT, context_id=ctx.id), want, rtol=0, atol=1e-5)
        print(f"TAKEOVER dead expert group: answered again after {time.perf_counter() - t0:.2f} s")
        held = [ray.get(mesh.groups[g].stats.remote())["adopted_experts"] for g in (0, 2)]
        assert sorted(sum(held, [])) == [list(em_partition(mesh)[1])]
        assert mesh.generate(PROMPT, context_id=ctx.id, max_new_tokens=NEW).token_ids == tokens
    finally:
        mesh.shutdown()


def em_partition(mesh):
    from expertmesh.model.moe import expert_partition

    return [(r.start, r.stop) for r in expert_partition(mesh.config.num_experts, len(mesh.groups))]
