"""Two meshes on one store (a RayService upgrade runs the old and the new cluster side by side):
a mesh starting never deletes the other's registrations in flight; a context registered through
one is answered by the other at once and listed within SYNC_S; a drop through one is refused by
the other, never answered over deleted files; a mesh killed mid-registration leaves the other's
contexts intact. Real Ray actors on the session's cluster."""

import asyncio
import time

import numpy as np
import pytest
import ray
import torch

import expertmesh as em
from expertmesh.store.catalog import GRACE_S, SYNC_S
from tests.conftest import VOCAB

pytestmark = pytest.mark.ray
ARCH = "mixtral"


def ids(n, seed):
    return torch.randint(4, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def start(ckpt, store):
    return em.Mesh.start(ckpt, context_shards=2, expert_groups=2, page_size=16, store=store)


def eventually(check, within_s):
    t0 = time.monotonic()
    while True:
        try:
            return check(), time.monotonic() - t0
        except AssertionError:
            if time.monotonic() - t0 > within_s:
                raise
            time.sleep(0.1)


def test_two_meshes_share_one_store(ray_cluster, tiny_checkpoint, tmp_path):
    ckpt, store = tiny_checkpoint(ARCH), str(tmp_path / "store")
    prompt = ids(7, 9)
    a = start(ckpt, store)
    b = None
    try:
        # registrations in flight on A while B starts (B's start-up clean-up runs meanwhile)
        refs = [a.router.register_context.remote(ids(600, 10 + i), "exact") for i in range(4)]
        b = start(ckpt, store)
        refs += [a.router.register_context.remote(ids(3000, 20 + i), "exact") for i in range(4)]
        cleaned = 0
        while True:  # B cleans the store over and over while A's registrations run
            _, in_flight = ray.wait(refs, num_returns=len(refs), timeout=0)
            if not in_flight:
                break
            b.clean_store()
            cleaned += 1
        assert cleaned >= 1
        infos = ray.get(refs)  # every one of A's registrations completed
        for info in infos:  # ... and B answers each at once, with A's logits
            assert np.array_equal(b.forward_logits(prompt, context_id=info.id),
                                  a.forward_logits(prompt, context_id=info.id))
        # registered through A after B started: listed by B within SYNC_S
        late = a.register_context(ids(300, 30), mode="blockwise")
        _, took = eventually(lambda: assert_listed(b, late.id), within_s=SYNC_S + 3)
        print(f"SHARED listed by the other mesh after {took:.2f} s")
        # dropped through B: A refuses it within SYNC_S; the files outlive the drop (A is live)
        victim = infos[0]
        files = sorted((tmp_path / "store" / "segments").glob(f"{victim.id}.*.kv"))
        assert files
        b.drop_context(victim.id)
        assert all(f.exists() for f in files)  # not deleted under a live mesh's feet
        _, took = eventually(lambda: assert_refused(a, prompt, victim.id), within_s=SYNC_S + 3)
        print(f"SHARED drop refused by the other mesh after {took:.2f} s")
        assert all(f.exists() for f in files) and GRACE_S > SYNC_S
        # the others keep answering
        assert np.array_equal(b.forward_logits(prompt, context_id=infos[1].id),
                              a.forward_logits(prompt, context_id=infos[1].id))
    finally:
        a.shutdown()
        if b is not None:
            b.shutdown()


def assert_refused(mesh, prompt, cid):
    try:
        mesh.forward_logits(prompt, context_id=cid)
    except em.ContextNotFound as exc:
        assert "dropped (through another mesh" in str(exc)
        return
    raise AssertionError(f"{cid} still answered")


def assert_listed(mesh, cid):
    assert cid in {c.id for c in mesh.contexts()}


def assert_on(mesh, cid, shards):
    assert {c.id: c.shards for c in mesh.contexts()}[cid] == shards


def test_a_mesh_killed_mid_registration_leaves_the_others_contexts(ray_cluster, tiny_checkpoint, tmp_path):
    ckpt, store = tiny_checkpoint(ARCH), str(tmp_path / "store")
    prompt = ids(5, 8)
    keep = start(ckpt, store)
    doomed = start(ckpt, store)
    try:
        kept = keep.register_context(ids(400, 1), mode="exact")
        want = keep.forward_logits(prompt, context_id=kept.id)
        refs = [doomed.router.register_context.remote(ids(4000, 2 + i), "exact") for i in range(6)]
        ray.wait(refs, num_returns=1, timeout=30)  # mid-registration: one done, the rest in flight
        ray.kill(doomed.router, no_restart=True)
        for actor in [*doomed.shards, *doomed.groups]:
            ray.kill(actor, no_restart=True)
        failed = 0
        for ref in refs:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                failed += 1
        assert failed >= 1
        again = start(ckpt, store)  # a new mesh on the store: its start-up clean-up runs
        try:
            for m in (keep, again):
                assert np.array_equal(m.forward_logits(prompt, context_id=kept.id), want)
        finally:
            again.shutdown()
    finally:
        keep.shutdown()


def test_a_smaller_mesh_serves_and_takes_over_a_bigger_ones_contexts(ray_cluster, tiny_checkpoint, tmp_path):
    """A RayService upgrade that shrinks the pool: contexts stored by a mesh with 4 shards are
    answered, exactly, by a mesh with 2 (its shards serve the missing shards' segments from the
    store, as for a lost shard), and its `rebalance` moves them onto its own shards; the bigger
    mesh reads the rewritten manifests and reads those segments from the same shards too."""
    ckpt, store = tiny_checkpoint(ARCH), str(tmp_path / "store")
    prompt = ids(6, 40)
    big = em.Mesh.start(ckpt, context_shards=4, expert_groups=2, page_size=16, store=store)
    small = None
    try:
        singles = [big.register_context(ids(400, 41 + i), mode="exact", shards=1) for i in range(4)]
        spread = big.register_context(ids(900, 45), mode="exact")  # over all 4 shards
        assert len(spread.shards) == 4
        beyond = [c for c in singles if c.shards[0] >= 2]  # on shards the smaller mesh does not have
        assert beyond, [c.shards for c in singles]
        want = {c.id: big.forward_logits(prompt, context_id=c.id) for c in (*singles, spread)}
        small = start(ckpt, store)  # 2 context shards
        assert set(want) <= {c.id for c in small.contexts()}
        for cid, logits in want.items():
            assert np.array_equal(small.forward_logits(prompt, context_id=cid), logits), cid
        ray.kill(small.router, no_restart=False)  # the view of the missing shards is rebuilt from the store
        ray.kill(small.shards[1], no_restart=False)  # and a shard standing in for them restarts
        for cid, logits in want.items():
            assert np.array_equal(small.forward_logits(prompt, context_id=cid), logits), cid
        report = small.rebalance()
        moved = {m["context"]: (m["from"], m["to"]) for m in report["moved"]}
        for c in beyond:  # onto its own shards
            assert moved[c.id][0] == c.shards[0] and moved[c.id][1] in (0, 1), report
            assert next(x for x in small.contexts() if x.id == c.id).shards[0] in (0, 1)
        for c in beyond:  # the bigger mesh reads the rewritten manifests and follows the move
            eventually(lambda c=c: assert_on(big, c.id, (moved[c.id][1],)), within_s=SYNC_S + 3)
        for cid, logits in want.items():  # the same answers after the move (both meshes)
            assert np.array_equal(small.forward_logits(prompt, context_id=cid), logits), cid
            assert np.array_equal(big.forward_logits(prompt, context_id=cid), logits), cid
        high = beyond[0]
        small.drop_context(high.id)
        eventually(lambda: assert_refused(big, prompt, high.id), within_s=SYNC_S + 3)
    finally:
        big.shutdown()
        if small is not None:
            small.shutdown()
