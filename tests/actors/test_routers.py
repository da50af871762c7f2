"""A mesh of several routers over one context pool: each router exact against Hugging Face,
contexts registered or dropped through one answered or refused by every other, requests
spread over them, and a router killed under concurrent requests: they fail over, same tokens."""

import threading
import time

import numpy as np
import pytest
import ray

import expertmesh as em
from expertmesh.errors import ContextNotFound
from tests.actors.test_mesh_parity import hf_logits, ids

pytestmark = pytest.mark.ray
PROMPT = [5, 17, 42, 99, 7, 3]


@pytest.mark.parametrize("stored", [False, True], ids=["no store", "store"])
def test_two_routers_are_exact_and_share_one_directory(ray_cluster, tiny_checkpoint, hf_model, tmp_path, stored):
    mesh = em.Mesh.start(tiny_checkpoint("mixtral"), context_shards=2, expert_groups=2, page_size=16, routers=2,
                         store=str(tmp_path / "store") if stored else None)
    try:
        assert len(mesh.routers) == 2
        context = ids(150, 1)
        want = hf_logits(hf_model("mixtral"), context + PROMPT)[-len(PROMPT):]
        ctx = mesh.register_context(context, mode="exact", router=0)
        assert [c.id for c in mesh._set.call("list_contexts", pin=1)] == [ctx.id]  # listed by the other at once
        for r in (1, 0):  # answered by either, exactly
            assert np.abs(mesh.forward_logits(PROMPT, context_id=ctx.id, router=r) - want).max() <= 1e-4
        a = mesh.generate(PROMPT, context_id=ctx.id, max_new_tokens=12, router=0).token_ids
        assert mesh.generate(PROMPT, context_id=ctx.id, max_new_tokens=12, router=1).token_ids == a
        mesh.drop_context(ctx.id, router=1)  # refused by every router once it returns
        for r in (0, 1):
            with pytest.raises(ContextNotFound, match="dropped"):
                mesh.forward_logits(PROMPT, context_id=ctx.id, router=r)
        assert mesh.contexts() == []
        with pytest.raises(ValueError, match=r"router must be an integer in 0\.\.1"):
            mesh.forward_logits(PROMPT, router=2)
        stats = mesh.stats()
        assert len(stats["routers"]) == 2 and all(r["steps"] > 0 for r in stats["routers"])
        assert all(s["steps_served"] > 0 for s in stats["shards"])
    finally:
        mesh.shutdown()


def test_requests_spread_over_routers_and_fail_over_when_one_dies(ray_cluster, tiny_checkpoint, tmp_path):
    mesh = em.Mesh.start(tiny_checkpoint("mixtral"), context_shards=2, expert_groups=2, page_size=16, routers=2,
                         store=str(tmp_path / "store"))
    try:
        ctx = mesh.register_context(ids(200, 3), mode="exact")
        want = mesh.generate(PROMPT, context_id=ctx.id, max_new_tokens=24).token_ids
        steps = [s["steps"] for s in mesh.stats()["routers"]]
        out, errors = {}, []

        def ask(k):
            try:
                res = mesh.generate(PROMPT, context_id=ctx.id, max_new_tokens=24)
                out[k] = (res.token_ids, time.monotonic())
            except Exception as exc:  # noqa: BLE001 - recorded: the test fails on it
                errors.append(repr(exc))
        threads = [threading.Thread(target=ask, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.4)
        killed = time.monotonic()
        ray.kill(mesh.routers[0], no_restart=False)  # Ray restarts it; its requests go to router 1 meanwhile
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert len(out) == 8 and all(tokens == want for tokens, _ in out.values())
        print(f"\nFAILOVER last request done {max(t for _, t in out.values()) - killed:.2f} s after the kill")
        after = [s.get("steps", 0) for s in mesh.stats()["routers"]]
        assert after[1] > steps[1]  # router 1 served
        deadline = time.monotonic() + 60  # router 0 is back and serves again (pinned)
        while True:
            try:
                got = mesh.generate(PROMPT, context_id=ctx.id, max_new_tokens=24, router=0).token_ids
                break
            except Exception:  # noqa: BLE001 - still restarting
                assert time.monotonic() < deadline
                time.sleep(0.5)
        assert got == want
    finally:
        mesh.shutdown()


def test_a_drop_through_one_router_lets_another_finish_its_streams(ray_cluster, tiny_checkpoint):
    """No store (a drop deletes the pages): a context dropped through router 0 while router 1
    streams over it, then the reverse. Each stream finishes with its tokens (the drop fences
    every router's running requests); new requests are refused at once; the shards let the
    segments go once the streams end."""
    from tests.faults import chunk_tokens, greedy_stream

    mesh = em.Mesh.start(tiny_checkpoint("mixtral"), context_shards=2, expert_groups=2, page_size=16, routers=2)
    try:
        for streaming, dropping in ((1, 0), (0, 1)):
            ctx = mesh.register_context(ids(200, 5 + streaming), mode="exact")
            want = mesh.generate(PROMPT, context_id=ctx.id, max_new_tokens=40, router=streaming).token_ids
            gen = greedy_stream(mesh.routers[streaming], PROMPT, ctx.id, 40)
            got = chunk_tokens(ray.get(next(gen)))
            mesh.drop_context(ctx.id, router=dropping)
            for r in (0, 1):  # refused by both once the drop returned
                with pytest.raises(ContextNotFound, match="dropped"):
                    mesh.forward_logits(PROMPT, context_id=ctx.id, router=r)
            for ref in gen:
                got += chunk_tokens(ray.get(ref))
            assert got == want, (streaming, dropping)
            deadline = time.monotonic() + 30  # then the segments go
            while any(ctx.id in ray.get(s.contexts.remote()) for s in mesh.shards):
                assert time.monotonic() < deadline, "the dropped context's segments stayed on the shards"
                time.sleep(0.2)
    finally:
        mesh.shutdown()


def test_calls_go_to_the_least_busy_router_ties_in_turn():
    from expertmesh.platform.router_set import RouterSet

    routers = RouterSet(["r0", "r1", "r2"])
    assert sorted(routers.pick() for _ in range(3)) == [0, 1, 2]  # idle: in turn
    with routers.busy(0), routers.busy(1), routers.busy(1):
        assert {routers.pick() for _ in range(4)} == {2}
        with routers.busy(2), routers.busy(2):
            assert {routers.pick() for _ in range(4)} == {0}
    assert routers.pick(pin=1) == 1
    for bad in (3, -1, True, "0"):
        with pytest.raises(ValueError, match=r"router must be an integer in 0\.\.2 \(the mesh has 3 router\(s\)\)"):
            routers.pick(pin=bad)
    assert routers.fallbacks(0) == [1, 2]


def test_a_failed_call_runs_on_every_other_router_then_on_the_first_once_back(monkeypatch):
    """The one failover policy of `RouterSet.call` (driver) and Serve (calls and streams): the
    picked router, each other one (least busy first), then the first after it came back; a
    pinned call only its router, twice."""
    import asyncio

    import expertmesh.platform.router_set as rs

    waited = []
    monkeypatch.setattr(rs, "wait_until_back", lambda actor, what, timeout_s: waited.append((actor, what)))
    routers = rs.RouterSet(["r0", "r1", "r2"])
    with routers.busy(1), routers.busy(2), routers.busy(2):
        assert list(routers.attempts()) == [0, 1, 2, 0]  # the least busy first, each once, then back
    assert waited == [("r0", "router 0")]

    async def collect():
        return [i async for i in routers.attempts_async(timeout_s=1.0)]
    with routers.busy(0), routers.busy(0), routers.busy(2):
        assert asyncio.run(collect()) == [1, 2, 0, 1]
    assert list(routers.attempts(pin=2)) == [2, 2]
    assert waited[1:] == [("r1", "router 1"), ("r2", "router 2")]
    assert list(rs.RouterSet(["only"]).attempts()) == [0, 0] and waited[-1] == ("only", "the router")
