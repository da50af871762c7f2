"""Context shards added to a running mesh, and segments moved between shards (placement.py):
new contexts use new shards at once, `rebalance` evens the tokens per shard and evacuates a
shard lost for good, requests keep running and logits stay bit-equal, the layout survives a
router restart."""

import json
import threading
import time

import numpy as np
import pytest
import ray

import expertmesh as em
from expertmesh.actors.router.placement import plan_moves
from expertmesh.cli import main
from expertmesh.dataplane.liveness import actor_state
from tests.actors.test_takeover import held, kill_for_good

pytestmark = pytest.mark.ray
PROMPT = [5, 17, 42, 99, 7, 3]


def test_plan_moves_evens_load_and_never_doubles_a_context_on_a_shard():
    # two shards full, two new and empty
    layout = {f"c{k}": [(0, 100), (1, 100)] for k in range(4)}
    moves = plan_moves(layout, [True] * 4)
    where = {cid: [s for s, _ in segs] for cid, segs in layout.items()}
    for cid, i, dst in moves:
        where[cid][i] = dst
    load = [0] * 4
    for cid, shards in where.items():
        assert len(set(shards)) == len(shards)  # one segment of a context per shard
        for s in shards:
            load[s] += 100
    assert load == [200, 200, 200, 200], (moves, load)
    # a shard that is not running: its segments go first, never onto a shard already holding the context
    layout = {"a": [(0, 50), (1, 50)], "b": [(1, 30)]}
    moves = plan_moves(layout, [True, False, True])
    assert moves == [("a", 1, 2), ("b", 0, 0)]
    # busy: a shard still letting go of a context's old segment takes none of it
    assert plan_moves({"a": [(0, 100)]}, [True, True], busy={"a": {1}}) == []
    # base load that cannot move counts; nothing to gain: no move
    assert plan_moves({"a": [(0, 10)]}, [True, True], base=[0, 20]) == []
    assert plan_moves({}, [True]) == []


def test_add_shards_then_rebalance_moves_segments_while_requests_run(ray_cluster, tiny_checkpoint, tmp_path):
    mesh = em.Mesh.start(tiny_checkpoint("mixtral"), context_shards=2, expert_groups=2, page_size=16,
                         store=str(tmp_path / "store"))
    try:
        ctxs = [mesh.register_context(list(range(4 + k, 260 + k)), mode="exact") for k in range(3)]
        want = {c.id: mesh.forward_logits(PROMPT, context_id=c.id) for c in ctxs}
        tokens = mesh.generate(PROMPT, context_id=ctxs[0].id, max_new_tokens=40).token_ids
        assert mesh.add_shards(2) == [2, 3]
        assert len(mesh.shards) == 4
        fresh = mesh.register_context(list(range(30, 90)), mode="exact", shards=1)
        assert fresh.shards[0] in (2, 3)  # new contexts use the new capacity at once
        mesh.drop_context(fresh.id)

        out = {}  # a long generation runs through the rebalance
        worker = threading.Thread(target=lambda: out.setdefault("res", mesh.generate(
            PROMPT, context_id=ctxs[0].id, max_new_tokens=40)))
        worker.start()
        time.sleep(0.3)
        res = mesh.rebalance()
        worker.join(120)
        print(f"\nREBALANCE moved {len(res['moved'])} segments in {res['seconds']:.3f} s: "
              f"{res['tokens_before']} -> {res['tokens_after']}")
        assert out["res"].token_ids == tokens
        assert res["moved"] and {m["to"] for m in res["moved"]} <= {2, 3}
        assert max(res["tokens_after"]) - min(res["tokens_after"]) < max(res["tokens_before"]) - \
            min(res["tokens_before"])
        assert min(res["tokens_after"]) > 0
        for c in ctxs:  # bit-equal wherever the segments live
            np.testing.assert_array_equal(mesh.forward_logits(PROMPT, context_id=c.id), want[c.id])
        layout = {c.id: c.shards for c in mesh.contexts()}
        deadline = time.monotonic() + 20  # the old shards let moved segments go
        while time.monotonic() < deadline:
            h = held(mesh)
            if all(cid in h[s] for cid, shards in layout.items() for s in shards) and \
                    all(cid not in h[s] for cid, shards in layout.items() for s in range(4) if s not in shards):
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"shards hold {held(mesh)}; layout {layout}")

        ray.kill(mesh.router, no_restart=False)  # a restarted router finds the added shards and the layout
        got = mesh.forward_logits(PROMPT, context_id=ctxs[1].id)
        np.testing.assert_array_equal(got, want[ctxs[1].id])
        assert {c.id: c.shards for c in mesh.contexts()} == layout
        assert len(mesh._call("describe")["shards"]) == 4  # (through the router set: the kill may strike late)
        assert mesh.rebalance()["moved"] == []  # balanced already

        # scale-in: shard 0's segments open on the others from the store while a generation runs
        out = {}
        worker = threading.Thread(target=lambda: out.setdefault("res", mesh.generate(
            PROMPT, context_id=ctxs[0].id, max_new_tokens=40)))
        worker.start()
        time.sleep(0.3)
        res = mesh.remove_shards([0])
        worker.join(120)
        assert out["res"].token_ids == tokens
        assert res["removed"] == [0] and res["tokens_after"][0] == 0 and {m["how"] for m in res["moved"]} <= {"store"}
        assert all(0 not in c.shards for c in mesh.contexts()) and len(mesh.shards) == 3
        assert mesh.pool()["shards"][0]["state"] == "REMOVED"
        for c in ctxs:
            np.testing.assert_array_equal(mesh.forward_logits(PROMPT, context_id=c.id), want[c.id])
    finally:
        mesh.shutdown()


def test_remove_shards_carries_segments_peer_to_peer_without_a_store(ray_cluster, tiny_checkpoint):
    """No store: a leaving shard's segments go to the others as their files' bytes; requests keep
    running with the same tokens and bit-equal logits; the index is never used again; a
    restarted router knows the shard is gone."""
    mesh = em.Mesh.start(tiny_checkpoint("mixtral"), context_shards=3, expert_groups=1, page_size=16)
    try:
        ctxs = [mesh.register_context(list(range(4 + k, 200 + k)), mode="exact", shards=2) for k in range(3)]
        want = {c.id: mesh.forward_logits(PROMPT, context_id=c.id) for c in ctxs}
        victim = next(s for s in range(3) if sum(s in c.shards for c in ctxs) >= 2)
        on_victim = next(c for c in ctxs if victim in c.shards)
        tokens = mesh.generate(PROMPT, context_id=on_victim.id, max_new_tokens=40).token_ids
        out = {}
        worker = threading.Thread(target=lambda: out.setdefault("res", mesh.generate(
            PROMPT, context_id=on_victim.id, max_new_tokens=40)))
        worker.start()
        time.sleep(0.3)
        res = mesh.remove_shards([victim])
        worker.join(120)
        print(f"\nREMOVE_SHARDS (no store) {res}")
        assert out["res"].token_ids == tokens
        assert res["moved"] and {m["how"] for m in res["moved"]} == {"peer"} and res["tokens_after"][victim] == 0
        for c in ctxs:
            np.testing.assert_array_equal(mesh.forward_logits(PROMPT, context_id=c.id), want[c.id])
        assert all(victim not in c.shards for c in mesh.contexts())
        with pytest.raises(ValueError, match="not in the mesh"):
            mesh.remove_shards([victim])
        with pytest.raises(ValueError, match="no running context shard"):
            mesh.remove_shards([s for s in range(3) if s != victim])
        fresh = mesh.register_context(list(range(40, 120)), mode="exact", shards=2)
        assert victim not in fresh.shards
        assert mesh.add_shards(1) == [3]  # a new index, never the one taken out

        ray.kill(mesh.router, no_restart=False)  # a restarted router: the shard is gone, the layout stays
        deadline = time.monotonic() + 60
        while True:
            try:
                got = mesh.forward_logits(PROMPT, context_id=on_victim.id)
                states = [s["state"] for s in mesh.pool()["shards"]]
                break
            except Exception as exc:  # noqa: BLE001 - restarting
                assert time.monotonic() < deadline, repr(exc)
                time.sleep(0.5)
        np.testing.assert_array_equal(got, want[on_victim.id])
        assert states[victim] == "REMOVED" and len(states) == 4
    finally:
        mesh.shutdown()


def test_every_router_reads_a_moved_segment_from_its_new_shard(ray_cluster, tiny_checkpoint, tmp_path):
    """A rebalance through one router: the mesh's other routers learn the new layout at once,
    answer bit-equal from the new shards, and the old shards let the segments go for good (no
    router reopens them there)."""
    mesh = em.Mesh.start(tiny_checkpoint("mixtral"), context_shards=2, expert_groups=2, page_size=16, routers=2,
                         store=str(tmp_path / "store"))
    try:
        ctxs = [mesh.register_context(list(range(4 + k, 260 + k)), mode="exact", router=0) for k in range(3)]
        want = {c.id: mesh.forward_logits(PROMPT, context_id=c.id, router=1) for c in ctxs}  # router 1 opened them
        mesh.add_shards(2)
        res = mesh._set.call("rebalance", pin=0)
        assert res["moved"]
        layouts = [{c.id: c.shards for c in mesh._set.call("list_contexts", pin=r)} for r in (0, 1)]
        assert layouts[0] == layouts[1]  # told before rebalance returned
        for c in ctxs:
            for r in (1, 0):
                np.testing.assert_array_equal(mesh.forward_logits(PROMPT, context_id=c.id, router=r), want[c.id])
        deadline = time.monotonic() + 20  # the old shards let moved segments go, for both routers
        while time.monotonic() < deadline:
            h = held(mesh)
            if all(cid not in h[s] for cid, shards in layouts[0].items() for s in range(4) if s not in shards):
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"shards hold {held(mesh)}; layout {layouts[0]}")
        for c in ctxs:  # and router 1 does not open them there again
            np.testing.assert_array_equal(mesh.forward_logits(PROMPT, context_id=c.id, router=1), want[c.id])
        h = held(mesh)
        assert all(cid not in h[s] for cid, shards in layouts[0].items() for s in range(4) if s not in shards), h
    finally:
        mesh.shutdown()


def test_rebalance_evacuates_a_shard_lost_for_good(ray_cluster, tiny_checkpoint, tmp_path):
    mesh = em.Mesh.start(tiny_checkpoint("mixtral"), context_shards=3, expert_groups=2, page_size=16,
                         store=str(tmp_path / "store"))
    try:
        ctx = mesh.register_context(list(range(4, 300)), mode="exact")
        want = mesh.forward_logits(PROMPT, context_id=ctx.id)
        kill_for_good(mesh.shards[1])
        np.testing.assert_array_equal(mesh.forward_logits(PROMPT, context_id=ctx.id), want)  # a stand-in
        stats = mesh.stats()  # a lost shard is reported, not raised
        assert "ActorDiedError" in stats["shards"][1]["unavailable"] and stats["shards"][0]["index"] == 0
        shards = mesh.pool()["shards"]
        assert shards[1]["state"] == "DEAD" and "host" not in shards[1]  # a lost shard: nothing to ask
        assert shards[0]["host"] and shards[0]["store_bytes"] > 0 and shards[0]["memory_budget_bytes"] > 0
        assert any(h and f"{ctx.id}@1" in h for h in held(mesh))
        mesh.add_shards(1)
        res = mesh.rebalance()
        assert res["running"] == [True, False, True, True]
        assert [(m["from"], m["to"]) for m in res["moved"]][0] == (1, 3)  # the lost shard's segment first
        assert res["tokens_after"][1] == 0
        np.testing.assert_array_equal(mesh.forward_logits(PROMPT, context_id=ctx.id), want)
        info = next(c for c in mesh.contexts() if c.id == ctx.id)
        assert 1 not in info.shards
        deadline = time.monotonic() + 20  # the stand-in's alias is let go
        while any(h and f"{ctx.id}@1" in h for h in held(mesh)):
            assert time.monotonic() < deadline, held(mesh)
            time.sleep(0.2)
    finally:
        mesh.shutdown()


def test_rebalance_without_a_store_says_what_it_cannot_move(ray_cluster, tiny_checkpoint, capsys):
    mesh = em.Mesh.start(tiny_checkpoint("mixtral"), context_shards=2, expert_groups=2, page_size=16,
                         name="pooltest", detached=True)
    try:
        ctx = mesh.register_context(list(range(4, 200)), mode="exact")
        with pytest.raises(ValueError, match="n must be an integer >= 1"):
            mesh.add_shards(0)
        assert main(["pool", "add-shards", "1", "--mesh", "pooltest"]) == 0  # the operator's command
        assert json.loads(capsys.readouterr().out) == {"added": [2]}
        time.sleep(1)  # the command's driver state is gone: the shard it added lives on (detached, as the mesh)
        assert main(["pool", "status", "--mesh", "pooltest"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert [(s["index"], s["state"]) for s in status["shards"]] == [(0, "ALIVE"), (1, "ALIVE"), (2, "ALIVE")]
        assert status["shards"][2]["tokens"] == 0 and status["contexts"] == 1
        res = mesh.rebalance()
        assert res["moved"] == [] and res["not_moved"]["contexts"] == 1
        assert "store" in res["not_moved"]["why"]
        assert mesh.generate(PROMPT, context_id=ctx.id, max_new_tokens=4).completion_tokens == 4
        fresh = mesh.register_context(list(range(30, 90)), mode="exact", shards=1)
        assert fresh.shards == (2,)
        np.testing.assert_allclose(mesh.forward_logits(PROMPT, context_id=fresh.id),
                                   mesh.forward_logits(list(range(30, 90)) + PROMPT)[-len(PROMPT):], atol=1e-4)
        added = ray.get_actor("pooltest.context_shard2", namespace="expertmesh")
    finally:
        mesh.shutdown(stop_actors=True)
    deadline = time.monotonic() + 10  # the shard the command added goes with the mesh
    while actor_state(added) != "DEAD":
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_the_pool_command_adds_shards_only_to_a_detached_mesh(ray_cluster, tiny_checkpoint, capsys):
    mesh = em.Mesh.start(tiny_checkpoint("mixtral"), context_shards=1, expert_groups=1, name="pooldriver")
    try:
        assert main(["pool", "add-shards", "1", "--mesh", "pooldriver"]) == 2
        assert "was started by a driver, not detached" in capsys.readouterr().err
        assert len(mesh.pool()["shards"]) == 1
    finally:
        mesh.shutdown()


def test_an_expert_group_refuses_a_lost_groups_experts_that_would_not_fit(tiny_checkpoint, monkeypatch):
    from expertmesh.actors import expert_group
    from expertmesh.errors import CapacityError

    group = expert_group.ExpertGroup(tiny_checkpoint("mixtral"), 0, range(0, 2))
    assert group.adopt_experts(2, 4) == 4  # room: loaded
    group.release_experts(2, 4)
    monkeypatch.setattr(expert_group, "free_memory_bytes", lambda device: 1024)
    with pytest.raises(CapacityError, match=r"cannot take over experts 2\.\.3 of a lost group: they need .* MiB "
                                            r"and 0\.0 MiB is free on its cpu"):
        group.adopt_experts(2, 4)
    assert group.adopted == {}
    assert expert_group.free_memory_bytes(group.device) > 0
