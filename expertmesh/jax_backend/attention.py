"""Partial attention with log-sum-exp in JAX: the JAX twin of `expertmesh.model.attention`.

Visibility is decided from absolute positions exactly as the PyTorch side does (causal,
chunked-local, sliding window); GQA folds the g query heads of a KV head without copying K/V.
RoPE/NoPE is applied before queries reach a shard and stored K already carries it.

Static shapes: callers pad queries and keys to bucket sizes (`expertmesh.jax_backend.bucket`);
padding is masked by positions alone: a padded query has position -1 (sees nothing), a
padded key position `PAD_KEY` (seen by no query). So one compiled program serves every
request whose sizes fall in the same buckets.

Shapes: q [Tq, Hq, D], q_pos int32 [Tq]; k/v [Tk, Hkv, D], k_pos int32 [Tk];
out [Tq, Hq, D] fp32, lse [Tq, Hq] fp32 (-inf where a query sees no key of this part).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from expertmesh.model.attention import AttentionSpec

PAD_KEY = 2**30  # position of a padded key: never visible (positions are < 2**30)
PAD_QUERY = -1  # position of a padded query: sees no key


def visible(q_pos: jax.Array, k_pos: jax.Array, chunk_size: int | None, window: int | None) -> jax.Array:
    """Boolean mask [Tq, Tk]: key j is visible to query i."""
    qp, kp = q_pos[:, None], k_pos[None, :]
    mask = kp <= qp
    if chunk_size:
        mask &= (kp // chunk_size) == (qp // chunk_size)
    if window:
        mask &= (qp - kp) < window
    return mask


def _attend(q_TQD, q_pos, k_SKD, v_SKD, k_pos, scale, chunk_size, window):
    tq, hq, d = q_TQD.shape
    hkv = k_SKD.shape[1]
    g = hq // hkv
    # GQA: the g query heads of a KV head become g*Tq rows of one batched matmul per KV head
    q_KRD = q_TQD.astype(jnp.float32).reshape(tq, hkv, g, d).transpose(1, 2, 0, 3).reshape(hkv, g * tq, d)
    k_KSD = k_SKD.astype(jnp.float32).transpose(1, 0, 2)
    v_KSD = v_SKD.astype(jnp.float32).transpose(1, 0, 2)
    scores = jnp.einsum("krd,ksd->krs", q_KRD, k_KSD) * scale  # [Hkv, g*Tq, Tk]
    mask = jnp.tile(visible(q_pos, k_pos, chunk_size, window), (g, 1))[None]  # [1, g*Tq, Tk]
    scores = jnp.where(mask, scores, -jnp.inf)
    top = jnp.max(scores, axis=-1)  # [Hkv, g*Tq]
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    probs = jnp.where(mask, jnp.exp(scores - top[..., None]), 0.0)
    total = probs.sum(-1)  # [Hkv, g*Tq]
    safe = jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("krs,ksd->krd", probs, v_KSD) / safe[..., None]  # [Hkv, g*Tq, D]
    lse = jnp.where(total > 0, jnp.log(safe) + top, -jnp.inf)
    out = out.reshape(hkv, g, tq, d).transpose(2, 0, 1, 3).reshape(tq, hq, d)
    return out, lse.reshape(hkv, g, tq).transpose(2, 0, 1).reshape(tq, hq)


@functools.partial(jax.jit, static_argnames=("scale", "chunk_size", "window"))
def partial_attention(q, q_pos, k, v, k_pos, *, scale: float, chunk_size: int | None = None,
                      window: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Attention of queries over one part of the keys: (out [Tq, Hq, D], lse [Tq, Hq])."""
    return _attend(q, q_pos, k, v, k_pos, scale, chunk_size, window)


@functools.partial(jax.jit, static_argnames=("scale", "chunk_size", "window"))
def paged_attention(q, q_pos, k_pool, v_pool, slots, k_pos, *, scale: float, chunk_size: int | None = None,
                    window: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Partial attention over pages of a pool: k/v_pool [slots, S, Hkv, D], slots int32 [n]
    (padding: any slot), k_pos int32 [n*S] (padding: PAD_KEY) -> (out [Tq, Hq, D], lse [Tq, Hq])."""
    n, (s, hkv, d) = slots.shape[0], k_pool.shape[1:]
    k = jnp.take(k_pool, slots, axis=0).reshape(n * s, hkv, d)  # [n*S, Hkv, D]
    v = jnp.take(v_pool, slots, axis=0).reshape(n * s, hkv, d)
    return _attend(q, q_pos, k, v, k_pos, scale, chunk_size, window)


@jax.jit
def merge_two(out_a, lse_a, out_b, lse_b) -> tuple[jax.Array, jax.Array]:
    """Exact merge of two (out [T, H, D], lse [T, H]) partials over disjoint key parts."""
    top = jnp.maximum(lse_a, lse_b)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    wa, wb = jnp.exp(lse_a - top), jnp.exp(lse_b - top)  # [T, H]
    total = wa + wb
    safe = jnp.where(total > 0, total, 1.0)
    out = (wa[..., None] * out_a + wb[..., None] * out_b) / safe[..., None]
    return out, jnp.log(total) + top


def merge_partials(parts: list[tuple[jax.Array, jax.Array]]) -> tuple[jax.Array, jax.Array]:
    """Exact merge of any number of partials (pairwise, on the device)."""
    out, lse = parts[0]
    for o, l in parts[1:]:
        out, lse = merge_two(out, lse, o, l)
    return out, lse


@jax.jit
def quest_bound_rows(q, kmin, kmax) -> jax.Array:
    """Upper bound of q.k per page for any of several queries: q [T, Hq, D], kmin/kmax [P, Hkv, D]
    -> [P] (max over queries and heads); padded query rows must be zeros."""
    t, hq, d = q.shape
    hkv = kmin.shape[1]
    q_TKGD = q.astype(jnp.float32).reshape(t, hkv, hq // hkv, d)
    bound = (jnp.einsum("tkgd,pkd->tpkg", jnp.maximum(q_TKGD, 0.0), kmax)
             + jnp.einsum("tkgd,pkd->tpkg", jnp.minimum(q_TKGD, 0.0), kmin))  # [T, P, Hkv, g]
    return bound.max(axis=(0, 2, 3))


@functools.partial(jax.jit, donate_argnums=(0, 1))
def write_pages(k_pool, v_pool, slots, k_pages, v_pages) -> tuple[jax.Array, jax.Array]:
    """Pages into pool slots in place (the pools are donated): slots int32 [n] (padding: an
    out-of-range slot, dropped), k/v_pages [n, S, Hkv, D]."""
    return (k_pool.at[slots].set(k_pages.astype(k_pool.dtype), mode="drop"),
            v_pool.at[slots].set(v_pages.astype(v_pool.dtype), mode="drop"))


@functools.partial(jax.jit, donate_argnums=(0,))
def write_latent_pages(pool, slots, pages) -> jax.Array:
    """The same for a latent pool (MLA: one array is key and value)."""
    return pool.at[slots].set(pages.astype(pool.dtype), mode="drop")


def spec_args(spec: AttentionSpec) -> dict:
    """The static arguments of one layer's attention."""
    return {"scale": float(spec.scale), "chunk_size": spec.chunk_size or None, "window": spec.window or None}


def compilations() -> int:
    """Programs compiled so far by this module's jitted functions (all shapes)."""
    return sum(f._cache_size() for f in (partial_attention, paged_attention, merge_two, quest_bound_rows,
                                         write_pages))
