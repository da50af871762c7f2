"""JaxContextShard vs ContextShard in process (no Ray): the same partial attention and LSE over
stored pages: all pages, Quest-selected pages, chunked/windowed layers, several streamed
blocks, a pool too small for the context (pages from the file), bfloat16 pages."""

import numpy as np
import pytest

pytest.importorskip("jax")

from expertmesh.actors import jax_context_shard as jcs  # noqa: E402
from expertmesh.actors.context_shard import AttendItem, ContextShard  # noqa: E402
from expertmesh.model.attention import AttentionSpec  # noqa: E402

SPECS = [AttentionSpec(scale=0.25), AttentionSpec(scale=0.25, chunk_size=32), AttentionSpec(scale=0.25, window=40)]
HKV, HQ, D, PS = 2, 4, 16, 8
START, TOKENS = 100, 203  # a segment of a context: positions [100, 303), last page partial


def _shard(cls, kv_dtype="float32", memory_bytes=None):
    rng = np.random.default_rng(0)
    shard = cls(0, SPECS, None, PS, 1, None, memory_bytes, kv_dtype)
    shard.begin("c", "seg", START, START + TOKENS, len(SPECS), HKV, D)
    k = [rng.standard_normal((TOKENS, HKV, D), dtype=np.float32) for _ in SPECS]
    v = [rng.standard_normal((TOKENS, HKV, D), dtype=np.float32) for _ in SPECS]
    shard.append("c", START, k, v, np.arange(START, START + TOKENS))
    shard.finish("c")
    return shard


def _items(top_pages=None):
    rng = np.random.default_rng(1)
    out = []
    for pos in (np.array([330]), np.arange(303, 320), np.array([150, 210, 290, 500]), np.array([50])):
        q = rng.standard_normal((len(pos), HQ, D), dtype=np.float32)
        out.append(AttendItem("c", q, pos, {"r": len(pos)}, top_pages))
    return out


def _check(want, got, tol=1e-5):
    for (wo, wl, wr), (go, gl, gr) in zip(want, got):
        assert wr["pages"] == gr["pages"]
        assert np.array_equal(np.isinf(wl), np.isinf(gl))
        seen = ~np.isinf(wl)
        assert np.abs(wl[seen] - gl[seen]).max(initial=0.0) <= tol
        assert np.abs(wo - go).max() <= tol


@pytest.mark.parametrize("top_pages", [None, 3])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_attend_matches_torch_shard(layer, top_pages):
    torch_shard, jax_shard = _shard(ContextShard), _shard(jcs.JaxContextShard)
    for _ in range(2):  # first from the file, then from the pool
        _check(torch_shard.attend(layer, _items(top_pages)), jax_shard.attend(layer, _items(top_pages)))
    assert jax_shard.stats()["backend"] == "jax" and jax_shard.stats()["pool"]["hits"] > 0


def test_small_blocks_small_pool_and_bfloat16(monkeypatch):
    monkeypatch.setattr(jcs, "KEY_ROWS", 4 * PS)  # blocks of 4 pages: 7 blocks merged with LSE
    monkeypatch.setattr(jcs, "POOL_START", 2)  # the pool grows as pages come
    page = PS * HKV * D * 4
    for kv_dtype in ("float32", "bfloat16"):
        torch_shard = _shard(ContextShard, kv_dtype, memory_bytes=2 * 10 * page)  # 10 slots for 26 pages x 3 layers
        jax_shard = _shard(jcs.JaxContextShard, kv_dtype, memory_bytes=2 * 10 * page)
        assert jax_shard.stream_pages == 4
        for layer in (0, 2, 0):
            _check(torch_shard.attend(layer, _items()), jax_shard.attend(layer, _items()))
        stats = jax_shard.stats()
        assert stats["jax"]["pool_slots_allocated"] <= stats["pool"]["slots"] <= 20 < 26 * 3
        assert stats["pages_read"]["store"] > 0 and stats["pages_read"]["memory"] > 0


def test_actors_without_jax_name_the_extra_and_refuse_bad_backends(monkeypatch):
    import sys

    from expertmesh.actors.expert_group import ExpertGroup

    with pytest.raises(ValueError, match=r"expert_backend must be one of \('torch', 'jax'\), got 'tpu'"):
        ExpertGroup("unused", 0, range(2), backend="tpu")
    monkeypatch.setitem(sys.modules, "jax", None)  # as if JAX were not installed on this host
    with pytest.raises(ImportError, match=r"pip install 'expertmesh\[jax\]'"):
        ExpertGroup("unused", 0, range(2), backend="jax")
    with pytest.raises(ImportError, match=r"pip install 'expertmesh\[jax\]'"):
        jcs.JaxContextShard(0, SPECS, None, PS, 1)
