"""Actor restarts: a killed expert group, context shard or router costs seconds, not the mesh.

`ray.kill(handle, no_restart=False)` is what a crashed process, an OOM kill or a preempted host
looks like to Ray. Each kill lands mid-stream; greedy requests give the same tokens after
recovery. Recovery times are printed (`pytest -s`) and kept in docs/faults.md.
"""

import threading
import time

import pytest
import ray

import expertmesh as em
from tests.actors.test_takeover import kill_for_good
from tests.faults import chunk_tokens, greedy_stream

pytestmark = pytest.mark.ray
PROMPT = [5, 17, 42, 99, 7, 3]
NEW = 48


@pytest.fixture(scope="module")
def mesh(ray_cluster, tiny_checkpoint):
    m = em.Mesh.start(tiny_checkpoint("mixtral"), context_shards=2, expert_groups=2,
                      shard_capacity_tokens=512, page_size=16)
    yield m
    m.shutdown()


def stream_with_kill(mesh, victim, context_id=None):
    """Greedy tokens of a streamed request whose `victim` is killed after the first tokens;
    (tokens, seconds from the kill to the end of the stream) or the request's error."""
    gen = greedy_stream(mesh.router, PROMPT, context_id, NEW)
    tokens = chunk_tokens(ray.get(next(gen)))
    ray.kill(victim, no_restart=False)
    t0 = time.perf_counter()
    for ref in gen:
        tokens += chunk_tokens(ray.get(ref))
    return tokens, time.perf_counter() - t0


def test_killed_expert_group_restarts_and_the_stream_goes_on(mesh):
    want = mesh.generate(PROMPT, max_new_tokens=NEW).token_ids
    before = len(ray.get(mesh.router.stats.remote())["recoveries"])
    tokens, seconds = stream_with_kill(mesh, mesh.groups[0])
    assert tokens == want
    events = ray.get(mesh.router.stats.remote())["recoveries"][before:]  # the router lists what it did
    assert events and {e["kind"] for e in events} <= {"step_retry", "group_takeover", "group_back"}, events
    assert all("lost group 0" in e["detail"] for e in events if e["kind"] == "group_takeover"), events
    print(f"\nexpert group killed mid-stream: stream done {seconds:.2f} s after the kill")
    assert mesh.generate(PROMPT, max_new_tokens=NEW).token_ids == want


def test_killed_shard_loses_its_contexts_only(mesh):
    on_0 = mesh.register_context(list(range(10, 90)), shards=1)  # least-loaded first: shard 0
    on_1 = mesh.register_context(list(range(20, 100)), shards=1)  # then shard 1
    assert on_0.shards == (0,) and on_1.shards == (1,)
    want_0 = mesh.generate(PROMPT, context_id=on_0.id, max_new_tokens=NEW).token_ids
    want_free = mesh.generate(PROMPT, max_new_tokens=NEW).token_ids
    t0 = time.perf_counter()
    with pytest.raises(em.ContextNotFound, match="lost with context shard 1"):
        try:
            stream_with_kill(mesh, mesh.shards[1], on_1.id)
        finally:
            print(f"\ncontext shard killed mid-stream: its request failed after {time.perf_counter() - t0:.2f} s")
    with pytest.raises(em.ContextNotFound, match="lost with context shard 1"):  # the same, every later time
        mesh.generate(PROMPT, context_id=on_1.id, max_new_tokens=2)
    assert on_1.id not in [c.id for c in mesh.contexts()]
    lost = [e for e in ray.get(mesh.router.stats.remote())["recoveries"] if e["kind"] == "context_lost"]
    assert [on_1.id in e["detail"] for e in lost] == [True], lost  # counted once, as a recovery event
    # everything else serves on: the other shard's context, no context, new registrations
    assert mesh.generate(PROMPT, context_id=on_0.id, max_new_tokens=NEW).token_ids == want_0
    assert mesh.generate(PROMPT, max_new_tokens=NEW).token_ids == want_free
    ray.get(mesh.shards[1].ping.remote(), timeout=60)  # back (empty): new contexts use it again
    again = mesh.register_context(list(range(20, 100)))
    assert set(again.shards) == {0, 1}
    assert len(mesh.forward_logits(PROMPT, context_id=again.id)) == len(PROMPT)
    mesh.drop_context(again.id)
    mesh.drop_context(on_0.id)


def test_killed_router_restarts_behind_the_same_handle(mesh):
    """A restarted router (no store) serves the contexts its shards still hold."""
    ctx = mesh.register_context(list(range(30, 140)))
    with_ctx = mesh.generate(PROMPT, context_id=ctx.id, max_new_tokens=NEW).token_ids
    want = mesh.generate(PROMPT, max_new_tokens=NEW).token_ids
    with pytest.raises(ray.exceptions.RayActorError):  # Ray does not resubmit router calls ...
        stream_with_kill(mesh, mesh.router)
    t0 = time.perf_counter()
    assert mesh.generate(PROMPT, max_new_tokens=NEW).token_ids == want  # ... Mesh waits and retries once
    print(f"\nrouter killed mid-stream: the same request answered again {time.perf_counter() - t0:.2f} s later")
    long = mesh.generate(PROMPT, max_new_tokens=400)
    box = {}
    thread = threading.Thread(target=lambda: box.update(res=mesh.generate(PROMPT, max_new_tokens=400)))
    thread.start()
    time.sleep(long.total_s / 3)
    t0 = time.perf_counter()
    ray.kill(mesh.router, no_restart=False)
    thread.join(120)
    print(f"router killed under Mesh.generate ({long.total_s:.2f} s request): answered "
          f"{time.perf_counter() - t0:.2f} s after the kill")
    assert box["res"].token_ids == long.token_ids
    listed = {c.id: c for c in mesh.contexts()}
    assert listed[ctx.id] == ctx  # same id, owner, visibility, created, shards
    assert mesh.generate(PROMPT, context_id=ctx.id, max_new_tokens=NEW).token_ids == with_ctx
    mesh.drop_context(ctx.id)


def test_with_a_store_a_killed_shard_or_router_loses_nothing(ray_cluster, tiny_checkpoint, tmp_path):
    with em.Mesh.start(tiny_checkpoint("mixtral"), context_shards=2, expert_groups=2, page_size=16,
                       store=tmp_path / "store") as mesh:
        ctx = mesh.register_context(list(range(10, 120)))
        chat = '[{"role": "system", "content": "a conversation"}]'  # registered as messages (the HTTP API's)
        conv = mesh._set.call("register_context", list(range(20, 60)), "exact", None, None, "default", "private",
                              None, chat)
        want = mesh.generate(PROMPT, context_id=ctx.id, max_new_tokens=NEW).token_ids
        tokens, seconds = stream_with_kill(mesh, mesh.shards[1], ctx.id)
        print(f"\nwith a store, context shard killed mid-stream: stream done {seconds:.2f} s after the kill")
        assert tokens == want
        ray.kill(mesh.router, no_restart=False)
        t0 = time.perf_counter()
        assert mesh.generate(PROMPT, context_id=ctx.id, max_new_tokens=NEW).token_ids == want
        print(f"with a store, router killed: its context served again {time.perf_counter() - t0:.2f} s later")
        assert {c.id: c.chat for c in mesh.contexts()} == {ctx.id: None, conv.id: chat}  # its messages kept


def test_a_dead_actor_fails_requests_at_once_naming_it(ray_cluster, tiny_checkpoint):
    """An actor Ray will not restart (no restarts left, its node gone), without a store: a
    request over its contexts fails at once naming it (not after the 60 s join timeout): they
    are lost; the rest of the mesh serves on, and new contexts go to the shards running."""
    m = em.Mesh.start(tiny_checkpoint("mixtral"), context_shards=2, expert_groups=2, page_size=16)
    try:
        ctx = m.register_context(list(range(4, 200)), mode="exact")
        free = m.generate(PROMPT, max_new_tokens=4).token_ids
        kill_for_good(m.shards[1])
        t0 = time.monotonic()
        with pytest.raises(em.ContextNotFound, match=r"was lost with context shard 1: Ray reports its actor DEAD "
                                                     r"and the mesh has no store"):
            m.generate(PROMPT, context_id=ctx.id, max_new_tokens=4)
        took = time.monotonic() - t0
        print(f"RECOVERY dead shard reported after {took:.2f} s")
        assert took < 10
        assert m.generate(PROMPT, max_new_tokens=4).token_ids == free
        again = m.register_context(list(range(4, 100)), mode="exact")
        assert again.shards == (0,)
        assert len(m.forward_logits(PROMPT, context_id=again.id)) == len(PROMPT)
        with pytest.raises(em.Unavailable, match=r"2 context shard\(s\) needed and 1 running: context shards \[1\]"):
            m.register_context(list(range(4, 100)), shards=2)
    finally:
        m.shutdown()


def test_a_frozen_router_fails_its_callers_in_bounded_time(mesh, monkeypatch):
    """A router that cannot answer (SIGSTOP: a frozen VM; Ray still reports it alive) fails a
    driver's control call and request within their deadlines, not never; thawed, it serves on."""
    import os
    import signal

    from expertmesh.platform import router_set

    want = mesh.generate(PROMPT, max_new_tokens=8).token_ids
    pid = ray.get(mesh.router.__ray_call__.remote(lambda self: os.getpid()))
    monkeypatch.setattr(router_set, "CALL_TIMEOUT_S", 2.0)
    monkeypatch.setattr(router_set, "WORK_TIMEOUT_S", 3.0)
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(em.Unavailable, match="did not answer list_contexts within 2 s"):
            mesh.contexts()
        with pytest.raises(em.Unavailable, match="did not answer generate within 3 s"):
            mesh.generate(PROMPT, max_new_tokens=8)
        assert time.monotonic() - t0 < 10
    finally:
        os.kill(pid, signal.SIGCONT)
    assert mesh.generate(PROMPT, max_new_tokens=8).token_ids == want
