"""The mesh on a durable context store: restarts, drops, crashes mid-write, corruption, other
models, URI stores, tiers and page selection. Real Ray actors on the session's cluster."""

import os
import signal
import time

import numpy as np
import pytest
import ray
import torch

import expertmesh as em
from expertmesh.store import StoreMismatch
from tests.conftest import VOCAB

pytestmark = pytest.mark.ray
ARCH = "llama4"  # chunked-local RoPE + global NoPE layers, as the built-in model


def ids(n, seed):
    return torch.randint(4, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def start(ckpt, store, **kw):
    return em.Mesh.start(ckpt, context_shards=3, expert_groups=2, page_size=16, store=store, **kw)


def hf_logits(hf, seq):
    with torch.no_grad():
        return hf(torch.tensor([seq])).logits[0].numpy()


def test_contexts_survive_restart_with_equal_logits_and_drops_survive(ray_cluster, tiny_checkpoint, hf_model,
                                                                     tmp_path):
    ckpt, store = tiny_checkpoint(ARCH), str(tmp_path / "store")
    context, other, prompt = ids(203, 1), ids(150, 2), ids(7, 3)
    mesh = start(ckpt, store)
    a = mesh.register_context(context, mode="exact", owner="acme", visibility="shared", name="book")
    b = mesh.register_context(other, mode="blockwise")
    before = mesh.forward_logits(prompt, context_id=a.id)
    assert np.abs(before - hf_logits(hf_model(ARCH), context + prompt)[-len(prompt):]).max() <= 1e-4
    gen = mesh.generate(prompt, context_id=a.id, max_new_tokens=12)
    mesh.drop_context(b.id)
    mesh.shutdown()

    mesh = start(ckpt, store)
    try:
        listed = {c.id: c for c in mesh.contexts()}
        assert set(listed) == {a.id}  # the drop survived the restart
        assert listed[a.id] == a  # same id, owner, visibility, name, created, shards
        assert np.array_equal(mesh.forward_logits(prompt, context_id=a.id), before)
        assert mesh.generate(prompt, context_id=a.id, max_new_tokens=12).token_ids == gen.token_ids
        with pytest.raises(em.ContextNotFound):
            mesh.forward_logits(prompt, context_id=b.id)
        assert sorted(os.listdir(tmp_path / "store" / "segments")) == sorted(
            f"{a.id}.{i}.kv" for i in range(len(a.shards)))  # b's files went with its drop
        # the same tokens again: the stored KV is reused, not recomputed
        calls = sum(s["calls"] for s in mesh.stats()["shards"])
        again = mesh.register_context(context, mode="exact")
        assert again.id != a.id and sum(s["calls"] for s in mesh.stats()["shards"]) == calls
        assert np.array_equal(mesh.forward_logits(prompt, context_id=again.id), before)
        mesh.drop_context(a.id)  # files shared with `again` stay until its drop
        assert np.array_equal(mesh.forward_logits(prompt, context_id=again.id), before)
        mesh.drop_context(again.id)
        assert os.listdir(tmp_path / "store" / "segments") == []
    finally:
        mesh.shutdown()


def test_shard_killed_while_writing_leaves_the_store_consistent(ray_cluster, tiny_checkpoint, tmp_path):
    ckpt, store = tiny_checkpoint(ARCH), str(tmp_path / "store")
    mesh = start(ckpt, store, max_batch_tokens=64)  # many pieces: a long registration
    keep = mesh.register_context(ids(120, 5), mode="blockwise")
    pid = ray.get(mesh.shards[1].__ray_call__.remote(lambda self: os.getpid()))
    ref = mesh.router.register_context.remote(ids(2400, 6), "exact")  # ~38 pieces of 64 tokens
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.endswith(".part") for p in os.listdir(tmp_path / "store" / "tmp")):
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)  # the process dies mid-write
    with pytest.raises(Exception):
        ray.get(ref, timeout=120)
    mesh.shutdown()
    mesh = start(ckpt, store)
    try:
        assert [c.id for c in mesh.contexts()] == [keep.id]
        assert os.listdir(tmp_path / "store" / "tmp") == []  # orphans removed at start
        assert sorted(os.listdir(tmp_path / "store" / "segments")) == sorted(
            f"{keep.id}.{i}.kv" for i in range(len(keep.shards)))
        mesh.generate(ids(5, 7), context_id=keep.id, max_new_tokens=3)
    finally:
        mesh.shutdown()


def test_corrupted_page_fails_that_context_only_and_names_the_file(ray_cluster, tiny_checkpoint, tmp_path):
    ckpt, store = tiny_checkpoint(ARCH), tmp_path / "store"
    mesh = start(ckpt, str(store))
    bad = mesh.register_context(ids(300, 8), mode="exact")
    good = mesh.register_context(ids(300, 9), mode="exact")
    mesh.shutdown()
    victim = store / "segments" / f"{bad.id}.0.kv"
    raw = bytearray(victim.read_bytes())
    raw[-50] ^= 0xFF  # inside the last layer's V pages
    victim.write_bytes(bytes(raw))
    mesh = start(ckpt, str(store))
    try:
        with pytest.raises(em.ContextNotFound, match=f"{bad.id}.0.kv.*fails its checksum"):
            mesh.generate(ids(5, 10), context_id=bad.id, max_new_tokens=2)
        assert len(mesh.generate(ids(5, 10), context_id=good.id, max_new_tokens=2).token_ids) == 2
        victim.unlink()
        mesh.shutdown()
        mesh = start(ckpt, str(store))
        with pytest.raises(em.ContextNotFound, match=f"{bad.id}.0.kv is missing"):
            mesh.generate(ids(5, 10), context_id=bad.id, max_new_tokens=2)
        assert len(mesh.generate(ids(5, 10), context_id=good.id, max_new_tokens=2).token_ids) == 2
    finally:
        mesh.shutdown()


def test_store_of_another_model_is_refused(ray_cluster, tiny_checkpoint, tmp_path):
    store = str(tmp_path / "store")
    start(tiny_checkpoint(ARCH), store).shutdown()
    with pytest.raises(StoreMismatch, match="written by another model"):
        start(tiny_checkpoint("mixtral"), store)


def test_uri_store_round_trips(ray_cluster, tiny_checkpoint, tmp_path):
    ckpt, uri = tiny_checkpoint(ARCH), f"file://{tmp_path / 'remote'}"
    context, prompt = ids(180, 11), ids(6, 12)
    mesh = start(ckpt, uri)
    ctx = mesh.register_context(context, mode="blockwise")
    before = mesh.forward_logits(prompt, context_id=ctx.id)
    mesh.shutdown()
    assert (tmp_path / "remote" / "contexts" / f"{ctx.id}.json").is_file()
    mesh = start(ckpt, uri)
    try:
        assert [c.id for c in mesh.contexts()] == [ctx.id]
        assert np.array_equal(mesh.forward_logits(prompt, context_id=ctx.id), before)
    finally:
        mesh.shutdown()


def test_small_hot_budget_streams_pages_exactly_and_top_pages_reads_fewer(ray_cluster, tiny_checkpoint, hf_model,
                                                                         tmp_path):
    ckpt = tiny_checkpoint(ARCH)
    context, prompt = ids(900, 13), ids(8, 14)
    # 4 pages of 16 tokens hot per shard: nearly every page is read from the store
    mesh = start(ckpt, str(tmp_path / "store"), shard_memory_bytes=4 * 2 * 16 * 2 * 16 * 4)
    try:
        ctx = mesh.register_context(context, mode="exact")
        logits = mesh.forward_logits(prompt, context_id=ctx.id)
        assert np.abs(logits - hf_logits(hf_model(ARCH), context + prompt)[-len(prompt):]).max() <= 1e-4
        exact = mesh.generate(prompt, context_id=ctx.id, max_new_tokens=4)
        pages = exact.pathway["pages"]
        assert sum(p["store"] for p in pages.values()) > sum(p["memory"] for p in pages.values())
        assert all(p["pages"] == p["memory"] + p["store"] for p in pages.values())
        picked = mesh.generate(prompt, context_id=ctx.id, max_new_tokens=4, top_pages=2)
        assert sum(p["pages"] for p in picked.pathway["pages"].values()) < sum(p["pages"] for p in pages.values())
        with pytest.raises(ValueError, match="top_pages must be an integer >= 1"):
            mesh.generate(prompt, context_id=ctx.id, top_pages=0)
    finally:
        mesh.shutdown()


def test_bfloat16_kv_stays_close_to_float32(ray_cluster, tiny_checkpoint, hf_model, tmp_path):
    ckpt = tiny_checkpoint(ARCH)
    context, prompt = ids(200, 15), ids(6, 16)
    mesh = start(ckpt, None, kv_dtype="bfloat16")
    try:
        ctx = mesh.register_context(context, mode="exact")
        assert ctx.kv_dtype == "bfloat16"
        got = mesh.forward_logits(prompt, context_id=ctx.id)
        ref = hf_logits(hf_model(ARCH), context + prompt)[-len(prompt):]
        scale = np.abs(ref).max(axis=-1, keepdims=True)
        assert (np.abs(got - ref) / scale).max() <= 2e-2  # bf16 rounding of stored K/V only
    finally:
        mesh.shutdown()
    with pytest.raises(ValueError, match="kv_dtype must be one of"):
        start(ckpt, None, kv_dtype="float16")


@pytest.mark.parametrize("arch", ["mixtral", "llama4"])
def test_registration_in_many_pieces_is_exact(ray_cluster, tiny_checkpoint, hf_model, arch):
    """Pieces of 64 tokens (max_batch_tokens=64): each piece attends to the pages already written on
    its own shard and to the earlier segments; the result equals one forward over the context."""
    context, prompt = ids(333, 17), ids(5, 18)
    mesh = em.Mesh.start(tiny_checkpoint(arch), context_shards=2, expert_groups=2, page_size=16, max_batch_tokens=64)
    try:
        ctx = mesh.register_context(context, mode="exact")
        got = mesh.forward_logits(prompt, context_id=ctx.id)
        assert np.abs(got - hf_logits(hf_model(arch), context + prompt)[-len(prompt):]).max() <= 1e-4
    finally:
        mesh.shutdown()


def test_context_registered_after_a_drop_gives_the_same_logits_before_and_after_its_shard_is_killed(
        ray_cluster, tiny_checkpoint, tmp_path):
    """Slots freed by a drop are handed out again in order; a context registered into them
    answers as one registered into a fresh pool, and a SIGKILL of a shard holding it (it
    restarts and reopens its segment from the store) changes nothing."""
    ckpt, prompt = tiny_checkpoint(ARCH), ids(6, 12)
    mesh = start(ckpt, str(tmp_path / "store"))
    try:
        first = mesh.register_context(ids(300, 10), mode="exact")
        fresh = mesh.forward_logits(prompt, context_id=first.id)
        mesh.drop_context(first.id)
        again = mesh.register_context(ids(300, 10), mode="blockwise")  # other KV: not reused
        mesh.drop_context(again.id)
        ctx = mesh.register_context(ids(300, 10), mode="exact")  # into the slots the drops freed
        before = mesh.forward_logits(prompt, context_id=ctx.id)
        assert np.array_equal(before, fresh)
        tokens = mesh.generate(prompt, context_id=ctx.id, max_new_tokens=8).token_ids
        victim = mesh.shards[ctx.shards[0]]
        pid = ray.get(victim.__ray_call__.remote(lambda self: os.getpid()))
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.01)
        assert np.array_equal(mesh.forward_logits(prompt, context_id=ctx.id), before)
        assert mesh.generate(prompt, context_id=ctx.id, max_new_tokens=8).token_ids == tokens
    finally:
        mesh.shutdown()
