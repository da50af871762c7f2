"""Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2) in its absorbed form.

Per token and layer the KV cache holds one latent vector: the normed compression c of the
hidden state (`kv_lora_rank` values) followed by the rotated shared key k_rot
(`qk_rope_head_dim` values). Hugging Face expands c into per-head keys and values
(k_nope_h = W_UK_h c, v_h = W_UV_h c) before attending; the absorbed form folds W_UK into the
query and W_UV into the output instead, so attention runs over the latent itself:

    q_h   = [W_UK_h^T q_nope_h, rope(q_rot_h)]          [rank + rope]   (router)
    k     = [c, rope(k_rot)]  (one KV head, shared)     [rank + rope]   (stored, in pages)
    o_h   = softmax(q_h . k * scale) @ k                [rank + rope]   (context shards, merged)
    out_h = W_UV_h o_h[:rank]                            [v_head_dim]    (router) -> o_proj

q_h . k equals q_nope_h . k_nope_h + q_rot_h . k_rot_h, so the scores, the softmax and the
output are Hugging Face's up to float rounding. The value is the key itself (its first `rank`
values): a context stores one vector per token and layer, and shards run ordinary one-KV-head
attention over it (the last `rope` output values are computed and dropped).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from expertmesh.model.norm import RMSNorm
from expertmesh.model.rope import RopeScaling, apply_rope

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm: Hugging Face builds them with the default eps


@dataclasses.dataclass(frozen=True)
class LatentDims:
    q_lora_rank: int | None  # None: a plain q_proj (DeepSeek-V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def latent_dim(self) -> int:
        """Values stored per token and layer (and the query / output width per head)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def softmax_scale(self, scaling: RopeScaling) -> float:
        """1/sqrt(nope + rope), times YaRN's mscale(factor, mscale_all_dim)^2 as DeepSeek applies it."""
        scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        if scaling.rope_type != "default" and scaling.mscale_all_dim and scaling.factor > 1:
            m = 0.1 * scaling.mscale_all_dim * math.log(scaling.factor) + 1.0
            scale *= m * m
        return scale

    def expanded_values(self, heads: int) -> int:
        """K/V values per token and layer in the expanded form (what Hugging Face caches)."""
        return heads * (self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim)


class LatentAttention(nn.Module):
    """The projections of one MLA layer, under Hugging Face's names (`self_attn.*`)."""

    def __init__(self, dims: LatentDims, hidden: int, heads: int, bias: bool) -> None:
        super().__init__()
        self.dims, self.heads = dims, heads
        qk = dims.qk_nope_head_dim + dims.qk_rope_head_dim
        if dims.q_lora_rank:
            self.q_a_proj = nn.Linear(hidden, dims.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(dims.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(dims.q_lora_rank, heads * qk, bias=False)
        else:
            self.q_proj = nn.Linear(hidden, heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, dims.latent_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(dims.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(dims.kv_lora_rank, heads * (dims.qk_nope_head_dim + dims.v_head_dim), bias=False)
        self.o_proj = nn.Linear(heads * dims.v_head_dim, hidden, bias=bias)

    def _up(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, nope, rank] and W_UV [H, v, rank] (views of kv_b_proj)."""
        d = self.dims
        w = self.kv_b_proj.weight.view(self.heads, d.qk_nope_head_dim + d.v_head_dim, d.kv_lora_rank)
        return w[:, :d.qk_nope_head_dim], w[:, d.qk_nope_head_dim:]

    def qkv(self, h: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor, style: str, scale: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normed hidden [T, H] -> absorbed q [T, Hq, rank+rope], latent k = v [T, 1, rank+rope]."""
        d, t = self.dims, h.shape[0]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(h))) if d.q_lora_rank else self.q_proj(h)
        q = q.view(t, self.heads, d.qk_nope_head_dim + d.qk_rope_head_dim)
        q_nope, q_rot = q[..., :d.qk_nope_head_dim], q[..., d.qk_nope_head_dim:]
        w_uk, _ = self._up()
        q_lat = torch.einsum("thn,hnr->thr", q_nope, w_uk)
        q_rot = apply_rope(q_rot, pos, freqs, style, scale)
        ckv = self.kv_a_proj_with_mqa(h)
        c = self.kv_a_layernorm(ckv[:, :d.kv_lora_rank])
        k_rot = apply_rope(ckv[:, None, d.kv_lora_rank:], pos, freqs, style, scale)
        k = torch.cat([c[:, None, :], k_rot.to(c.dtype)], -1)  # [T, 1, rank + rope]
        return torch.cat([q_lat, q_rot.to(q_lat.dtype)], -1), k, k

    def out(self, attn: torch.Tensor) -> torch.Tensor:
        """Merged latent attention [T, Hq, rank+rope] -> o_proj(per-head values) [T, hidden]."""
        _, w_uv = self._up()
        o = torch.einsum("thr,hvr->thv", attn[..., :self.dims.kv_lora_rank].to(w_uv.dtype), w_uv)
        return self.o_proj(o.flatten(1))
