"""JAX partial attention, merge and Quest bound vs the PyTorch side (no Ray)."""

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
jnp = jax.numpy

from expertmesh.engine.pathway import quest_bound_rows as torch_quest  # noqa: E402
from expertmesh.jax_backend import attention as ja  # noqa: E402
from expertmesh.jax_backend import bucket
from expertmesh.model.attention import AttentionSpec, merge_partials, partial_attention  # noqa: E402

SPECS = {
    "global": AttentionSpec(scale=0.25),
    "chunk": AttentionSpec(scale=0.25, chunk_size=16),
    "window": AttentionSpec(scale=0.25, window=20),
}


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def padded(q, q_pos, k, v, k_pos):
    """Pad to bucket sizes as the shard does: queries at position -1, keys at PAD_KEY."""
    tq, tk = bucket(len(q_pos)), bucket(len(k_pos))
    qp = np.full(tq, ja.PAD_QUERY, np.int32)
    qp[:len(q_pos)] = q_pos.numpy()
    kp = np.full(tk, ja.PAD_KEY, np.int32)
    kp[:len(k_pos)] = k_pos.numpy()
    pad = lambda x, n: np.concatenate([x.numpy(), np.zeros((n - len(x), *x.shape[1:]), np.float32)])  # noqa: E731
    return pad(q, tq), qp, pad(k, tk), pad(v, tk), kp


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("case", ["decode", "prompt_over_context", "self", "gappy"])
def test_partial_attention_matches_torch(name, hq, hkv, case):
    spec, d = SPECS[name], 16
    if case == "decode":  # a few single queries far after the keys
        k_pos, q_pos = torch.arange(40, 90), torch.tensor([90, 95, 101])
    elif case == "prompt_over_context":
        k_pos, q_pos = torch.arange(0, 64), torch.arange(64, 77)
    elif case == "self":
        k_pos = q_pos = torch.arange(5, 42)
    else:  # keys of selected pages (holes), queries partly before them
        k_pos = torch.cat([torch.arange(0, 16), torch.arange(48, 64), torch.arange(80, 85)])
        q_pos = torch.tensor([3, 30, 50, 63, 70, 84, 99])
    q, k, v = rand(len(q_pos), hq, d, seed=1), rand(len(k_pos), hkv, d, seed=2), rand(len(k_pos), hkv, d, seed=3)
    want_o, want_l = partial_attention(q, q_pos, k, v, k_pos, spec)
    qn, qp, kn, vn, kp = padded(q, q_pos, k, v, k_pos)
    o, l = ja.partial_attention(qn, qp, kn, vn, kp, **ja.spec_args(spec))
    o, l = np.asarray(o)[:len(q_pos)], np.asarray(l)[:len(q_pos)]
    assert np.array_equal(np.isinf(l), np.isinf(want_l.numpy()))  # same rows see nothing
    seen = ~np.isinf(l)
    assert np.abs(l[seen] - want_l.numpy()[seen]).max(initial=0) <= 1e-5
    assert np.abs(o - want_o.numpy()).max() <= 1e-5
    assert (o[~seen] == 0).all()


def test_paged_attention_and_merge_match_torch():
    spec, ps, hkv, d = SPECS["global"], 8, 2, 16
    pool_k, pool_v = rand(10, ps, hkv, d, seed=4), rand(10, ps, hkv, d, seed=5)
    q, q_pos = rand(3, 4, d, seed=6), torch.tensor([70, 71, 72])
    slots_a, slots_b = [3, 7, 1], [0, 9]  # pages 0..2 and 3..4 of a segment, anywhere in the pool
    parts_t, parts_j = [], []
    for first, slots in ((0, slots_a), (3, slots_b)):
        pos = torch.arange(first * ps, (first + len(slots)) * ps)
        k = pool_k[slots].reshape(-1, hkv, d)
        v = pool_v[slots].reshape(-1, hkv, d)
        parts_t.append(partial_attention(q, q_pos, k, v, pos, spec))
        n = bucket(len(slots), 4)
        sl = np.zeros(n, np.int32)
        sl[:len(slots)] = slots
        kp = np.full(n * ps, ja.PAD_KEY, np.int32)
        kp[:len(pos)] = pos.numpy()
        qn, qp = np.zeros((8, 4, d), np.float32), np.full(8, -1, np.int32)
        qn[:3], qp[:3] = q.numpy(), q_pos.numpy()
        parts_j.append(ja.paged_attention(qn, qp, jnp.asarray(pool_k.numpy()), jnp.asarray(pool_v.numpy()), sl, kp,
                                          **ja.spec_args(spec)))
    want_o, want_l = merge_partials(parts_t)
    o, l = ja.merge_partials(parts_j)
    assert np.abs(np.asarray(o)[:3] - want_o.numpy()).max() <= 1e-5
    assert np.abs(np.asarray(l)[:3] - want_l.numpy()).max() <= 1e-5
    assert np.isinf(np.asarray(l)[3:]).all()  # padded rows stay neutral through the merge


def test_quest_bound_matches_torch():
    q, kmin = rand(5, 4, 16, seed=7), rand(30, 2, 16, seed=8)
    kmax = kmin + rand(30, 2, 16, seed=9).abs()
    want = torch_quest(q, kmin, kmax).numpy()
    qn = np.zeros((8, 4, 16), np.float32)
    qn[:5] = q.numpy()
    got = np.asarray(ja.quest_bound_rows(qn, kmin.numpy(), kmax.numpy()))
    assert np.abs(got - want).max() <= 1e-4


def test_write_pages_in_place_and_drops_padding():
    k = jnp.zeros((6, 2, 1, 1))
    v = jnp.zeros((6, 2, 1, 1))
    slots = np.array([4, 1, 6, 6], np.int32)  # the last two are padding (out of range)
    pages = np.arange(8, dtype=np.float32).reshape(4, 2, 1, 1) + 1
    k, v = ja.write_pages(k, v, slots, pages, pages)
    got = np.asarray(k)[:, :, 0, 0]
    assert got[4].tolist() == [1, 2] and got[1].tolist() == [3, 4] and got[[0, 2, 3, 5]].sum() == 0


def test_buckets_bound_compilations():
    spec = SPECS["chunk"]
    before = ja.partial_attention._cache_size()
    for tq in range(1, 17):  # 16 different query counts: two buckets (8, 16)
        q_pos = torch.arange(100, 100 + tq)
        q, k, v = rand(tq, 4, 16), rand(50, 2, 16), rand(50, 2, 16)
        ja.partial_attention(*padded(q, q_pos, k, v, torch.arange(50, 100)), **ja.spec_args(spec))
    assert ja.partial_attention._cache_size() - before <= 2
