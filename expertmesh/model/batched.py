"""Batched forward for training: ids [B, T] -> logits [B, T, V] (+ router logits).

The same layer steps as `MoETransformer.forward` (qkv, attention, MoE), with a batch
dimension and `scaled_dot_product_attention` (flash kernels on GPU, differentiable):
chunked-local layers attend within fixed chunks, sliding-window layers through a mask,
global layers causally. Rows are independent sequences starting at position 0; padding goes
at the end, where causal attention keeps it from touching real tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from expertmesh.model.attention import AttentionSpec, visible
from expertmesh.model.transformer import MoETransformer


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """q [B, Hq, T, D], k/v [B, Hkv, T, D] -> [B, Hq, T, D]."""
    b, hq, t, d = q.shape
    groups = hq // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if spec.chunk_size and t > spec.chunk_size:
        c = spec.chunk_size
        pad = -t % c
        if pad:  # pad the last chunk; padded rows are dropped below
            q, k, v = (F.pad(z, (0, 0, 0, pad)) for z in (q, k, v))
        n = (t + pad) // c

        def fold(z: torch.Tensor) -> torch.Tensor:  # [B, H, n*c, D] -> [B*n, H, c, D]
            return z.view(b, hq, n, c, d).transpose(1, 2).reshape(b * n, hq, c, d)

        o = F.scaled_dot_product_attention(fold(q), fold(k), fold(v), is_causal=True, scale=spec.scale)
        return o.view(b, n, hq, c, d).transpose(1, 2).reshape(b, hq, n * c, d)[:, :, :t]
    if spec.window and t > spec.window:
        i = torch.arange(t, device=q.device)
        mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < spec.window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=spec.scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=spec.scale)


def _attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same with the log-sum-exp a layer with sinks needs (plain, differentiable):
    q [B, Hq, T, D], k/v [B, Hkv, T, D] -> out [B, Hq, T, D], lse [B, Hq, T]."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    i = torch.arange(q.shape[2], device=q.device)
    scores = (q.float() @ k.float().transpose(-1, -2)) * spec.scale
    scores = scores.masked_fill(~visible(i, i, spec), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse[..., None]) @ v.float(), lse


def forward_batch(model: MoETransformer, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """ids [B, T] -> (logits [B, T, V] fp32, router logits per MoE layer [B*T, E])."""
    cfg = model.cfg
    b, t = ids.shape
    pos = torch.arange(t, device=ids.device).repeat(b)  # [B*T]
    x = model.embed(ids.reshape(-1))  # [B*T, H]
    router_logits = []
    def heads(z: torch.Tensor) -> torch.Tensor:  # [B*T, H, D] -> [B, H, T, D]
        return z.view(b, t, z.shape[1], cfg.head_dim).transpose(1, 2)

    def attention(layer, q, k, v):  # rows of the batch attend within their own sequence
        rows = (b * t, cfg.num_heads)
        if hasattr(layer, "sinks"):
            a, lse = _attention_lse(heads(q), heads(k), heads(v), layer.spec)
            return a.to(q.dtype).transpose(1, 2).reshape(*rows, cfg.head_dim), lse.transpose(1, 2).reshape(rows), None
        a = _attention(heads(q), heads(k), heads(v), layer.spec)  # [B, Hq, T, D]
        return a.transpose(1, 2).reshape(*rows, cfg.head_dim), None, None

    for layer in model.layers:
        x, rl, _ = layer(x, pos, attention)
        if rl is not None:
            router_logits.append(rl)
    return model.logits(x).view(b, t, -1), router_logits
