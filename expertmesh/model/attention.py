"""Partial attention with log-sum-exp, and the exact merge of partials.

Attention over a key set split into parts (context shards, the request's own tokens) is
exact when each part returns (output, lse) and the parts are merged with log-sum-exp.
Visibility is decided from absolute positions, so the same function serves causal
self-attention, a prompt over a registered context, chunked-local layers and sliding windows.

Shapes: q [Tq, Hq, D], k/v [Tk, Hkv, D], positions int64 [Tq] / [Tk];
out [Tq, Hq, D] fp32, lse [Tq, Hq] fp32 (-inf where a query sees no key of this part).
"""

from __future__ import annotations

import dataclasses

import torch
from torch.nn.utils.rnn import pad_sequence

_QUERY_BLOCK = 2048  # rows per masked block: bounds the [tq, Tk] mask in memory


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """What decides which keys a query of one layer sees."""

    scale: float
    chunk_size: int | None = None  # keys in the same chunk only (Llama-4 local layers)
    window: int | None = None  # sliding window (Mixtral)


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """Boolean mask [Tq, Tk]: key j is visible to query i."""
    qp, kp = q_pos[:, None], k_pos[None, :]
    mask = kp <= qp
    if spec.chunk_size:
        mask &= (kp // spec.chunk_size) == (qp // spec.chunk_size)
    if spec.window:
        mask &= (qp - kp) < spec.window
    return mask


def bounds(q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[int, int, int, int]:
    """(min, max) of the query positions and of the key positions (non-empty), in one read."""
    q, k = torch.stack(q_pos.aminmax()), torch.stack(k_pos.aminmax())
    return tuple(torch.cat([q, k.to(q.device, q.dtype)]).tolist())


def any_visible(q_pos: torch.Tensor, spec: AttentionSpec, b: tuple[int, int, int, int]) -> bool:
    """Cheap test whether a key part can matter to any query (no [Tq, Tk] mask); b: `bounds`."""
    q_lo, q_hi, k_lo, k_hi = b
    if k_lo > q_hi:
        return False
    if spec.chunk_size:  # conservative: chunks spanned by the keys' position range
        c = spec.chunk_size
        lo, hi = k_lo // c, k_hi // c
        if q_hi // c < lo or q_lo // c > hi:
            return False
        if not (lo <= q_lo // c and q_hi // c <= hi):  # some queries' chunks outside: look at each
            qc = q_pos // c
            if not bool(((qc >= lo) & (qc <= hi)).any()):
                return False
    if spec.window and q_lo - k_hi >= spec.window:
        return False
    return True


def _fully_visible(spec: AttentionSpec, b: tuple[int, int, int, int]) -> bool:
    q_lo, q_hi, k_lo, k_hi = b
    if k_hi > q_lo:
        return False
    if spec.chunk_size and k_lo // spec.chunk_size != q_hi // spec.chunk_size:
        return False
    if spec.window and q_hi - k_lo >= spec.window:
        return False
    return True


def lse_kernel(device_type: str, masked: bool, causal: bool, tq: int, tk: int) -> str:
    """Which kernel computes (out, lse) of one attention call.

    "cpu_flash": the CPU flash kernel (takes a mask as an additive bias); "cuda_efficient":
    the fused memory-efficient kernel with `compute_log_sumexp` (fp32 inputs, no mask, causal
    only over a square block: its causal mask is aligned top-left); "einsum": the plain
    computation, on any device (the fallback).
    """
    if device_type == "cpu":
        return "cpu_flash"
    fused = hasattr(torch.ops.aten, "_scaled_dot_product_efficient_attention")
    if device_type == "cuda" and fused and not masked and (not causal or tq == tk):
        return "cuda_efficient"
    return "einsum"


def _einsum_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                mask: torch.Tensor | None, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q [H, Tq, D], k/v [H, Tk, D] -> out [H, Tq, D], lse [H, Tq] (causal: aligned bottom-right)."""
    scores = torch.einsum("htd,hsd->hts", q, k) * scale  # [H, Tq, Tk]
    if causal:
        tq, tk = scores.shape[-2:]
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    if mask is not None:
        scores = scores.masked_fill(~mask[None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.einsum("hts,hsd->htd", probs, v), lse


def _sdpa_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              mask: torch.Tensor | None, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q [H, Tq, D], k/v [H, Tk, D] -> out [H, Tq, D], lse [H, Tq]."""
    kernel = lse_kernel(q.device.type, mask is not None, causal, q.shape[1], k.shape[1])
    if kernel == "cpu_flash":
        bias = None
        if mask is not None:
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
            bias = bias[None, None]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[None], k[None], v[None], 0.0, causal, attn_mask=bias, scale=scale
        )
        return out[0], lse[0]
    if kernel == "cuda_efficient":
        try:
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                q[None], k[None], v[None], None, True, 0.0, causal, scale=scale)[:2]
            return out[0], lse[0, :, :q.shape[1]].float()  # the LSE may be padded past Tq
        except RuntimeError:  # a GPU or shape the fused kernel does not take
            pass
    return _einsum_lse(q, k, v, scale, mask, causal)


def partial_attention(
    q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pos: torch.Tensor,
    spec: AttentionSpec,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of queries over one part of the keys: (out [Tq, Hq, D], lse [Tq, Hq])."""
    tq, hq, d = q.shape
    out = torch.zeros(tq, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((tq, hq), float("-inf"), dtype=torch.float32, device=q.device)
    if len(q_pos) == 0 or len(k_pos) == 0:
        return out, lse
    b = bounds(q_pos, k_pos)  # one read of the positions (a GPU syncs once)
    if not any_visible(q_pos, spec, b):
        return out, lse
    hkv = k.shape[1]
    groups = hq // hkv

    def folded(mask: torch.Tensor | None, rows: slice, cols) -> tuple[torch.Tensor, torch.Tensor]:
        """GQA without copying K/V: the g query heads of a KV head become g x rows queries."""
        qb = q[rows].float()
        t = qb.shape[0]
        qf = qb.view(t, hkv, groups, d).permute(1, 2, 0, 3).reshape(hkv, groups * t, d)
        kb, vb = k.float(), v.float()
        if cols is not None:
            kb, vb = kb[cols], vb[cols]
        m = None if mask is None else mask.repeat(groups, 1)  # [g*t, Tk]
        o, l = _sdpa_lse(qf, kb.transpose(0, 1), vb.transpose(0, 1), spec.scale, m, False)
        o = o.view(hkv, groups, t, d).permute(2, 0, 1, 3).reshape(t, hq, d)
        return o, l.view(hkv, groups, t).permute(2, 0, 1).reshape(t, hq)

    if _fully_visible(spec, b):
        return folded(None, slice(None), None)
    same = len(q_pos) == len(k_pos) and bool(torch.equal(q_pos, k_pos))
    contiguous = same and int(q_pos[-1] - q_pos[0]) == len(q_pos) - 1
    if contiguous and not spec.window:  # self-attention over one run of positions
        qh = q.float().transpose(0, 1)  # [Hq, Tq, D]
        kh = k.float().repeat_interleave(groups, dim=1).transpose(0, 1)  # [Hq, Tk, D]
        vh = v.float().repeat_interleave(groups, dim=1).transpose(0, 1)
        if not spec.chunk_size:
            o, l = _sdpa_lse(qh, kh, vh, spec.scale, None, True)
            return o.transpose(0, 1), l.transpose(0, 1)
        c, p0 = spec.chunk_size, int(q_pos[0])
        cuts = [0, *range(-p0 % c or c, tq, c), tq]  # chunk boundaries in row space
        for a, b in zip(cuts, cuts[1:]):  # causal within each chunk
            if a >= b:
                continue
            o, l = _sdpa_lse(qh[:, a:b], kh[:, a:b], vh[:, a:b], spec.scale, None, True)
            out[a:b], lse[a:b] = o.transpose(0, 1), l.transpose(0, 1)
        return out, lse
    for start in range(0, tq, _QUERY_BLOCK):
        rows = slice(start, start + _QUERY_BLOCK)
        qp = q_pos[rows]
        cand = k_pos <= int(qp.max())  # 1-D prefilter before the [tq, Tk] mask
        if spec.chunk_size:
            cand &= torch.isin(k_pos // spec.chunk_size, torch.unique(qp // spec.chunk_size))
        if spec.window:
            cand &= k_pos > int(qp.min()) - spec.window
        cols = cand.nonzero().squeeze(1)
        if len(cols) == 0:
            continue
        mask = visible(qp, k_pos[cols], spec)  # [tq, Tc]
        seen = mask.any(dim=1)
        o, l = folded(mask, rows, cols)
        out[rows] = torch.where(seen[:, None, None], o, 0.0)
        lse[rows] = torch.where(seen[:, None], l, float("-inf"))
    return out, lse


def merge_partials(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of (out [T, H, D], lse [T, H]) partials over disjoint key parts."""
    if len(parts) == 1:
        return parts[0]
    lses = torch.stack([p[1] for p in parts])  # [P, T, H]
    top = lses.max(dim=0).values
    top = torch.where(torch.isinf(top), 0.0, top)
    w = torch.exp(lses - top)  # [P, T, H]
    total = w.sum(dim=0)
    out = sum(wi[..., None] * p[0] for wi, p in zip(w, parts))
    safe = torch.where(total > 0, total, 1.0)
    return out / safe[..., None], torch.log(total) + top


def batched_decode_attention(
    q: torch.Tensor, q_pos: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor],
    k_pos: list[torch.Tensor], spec: AttentionSpec,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per sequence over each sequence's own keys, in one padded batch.

    q [B, Hq, D], q_pos [B]; ks/vs[b] [L_b, Hkv, D], k_pos[b] [L_b] -> out [B, Hq, D], lse [B, Hq].
    """
    k = pad_sequence(ks, batch_first=True)  # [B, L, Hkv, D], zeros after each sequence's keys
    v = pad_sequence(vs, batch_first=True)
    pos = pad_sequence(k_pos, batch_first=True, padding_value=float(1 << 62))  # never visible (exact as a double)
    return padded_decode_attention(q, q_pos, k, v, pos, spec)


def padded_decode_attention(q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            pos: torch.Tensor, spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """batched_decode_attention over keys already padded: k/v [B, L, Hkv, D], positions [B, L]
    (padding: positions above every query's, so never visible)."""
    b, hq, d = q.shape
    hkv = k.shape[2]
    qp = q_pos.to(q.device)[:, None]
    mask = pos <= qp  # [B, L]
    if spec.chunk_size:
        mask &= (pos // spec.chunk_size) == (qp // spec.chunk_size)
    if spec.window:
        mask &= (qp - pos) < spec.window
    qg = q.float().view(b, hkv, hq // hkv, d)  # [B, Hkv, g, D]
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k.float()) * spec.scale
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, g]
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.einsum("bhgl,blhd->bhgd", probs, v.float())
    return out.reshape(b, hq, d), lse.reshape(b, hq)
