"""One decoder layer: its composition lives once, in `DecoderLayer.forward`.

    h = attn_norm(x);  q, k, v = qkv(h, pos)            (router)
    a = attention over KV parts, merged with LSE          (context shards + router)
    a = a * sigmoid(lse - sink)                           (GPT-OSS sinks: once, after the merge)
    x = x + o_proj(a)
    h = mlp_norm(x);   experts, weights = gate(h)        (router)
    y = experts(h) combined by weight (+ shared expert)   (expert groups)
    x = x + y

Where attention and the routed experts run is the caller's: `forward` takes an `attention`
function (the single-process model attends in place; the mesh's engine scatters queries to
context shards and merges their partials) and an `experts` dispatcher (in place, or rows sent
to expert groups). The same layer code runs in both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from typing import Callable

from expertmesh.model.config import ModelConfig
from expertmesh.model.mla import LatentAttention
from expertmesh.model.moe import DenseMLP, dispatch_pairs, expert_bank, route
from expertmesh.model.norm import RMSNorm, rms
from expertmesh.model.rope import rope_frequencies, rope_tables, rotate


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, experts: range | None = None) -> None:
        """experts: which experts of this layer to hold (None: all; empty: none)."""
        super().__init__()
        self.cfg, self.index = cfg, index
        h, d = cfg.hidden_size, cfg.head_dim
        self.attn_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.mlp_norm = RMSNorm(h, cfg.rms_norm_eps)
        if cfg.mla is not None:  # DeepSeek-V3: latent attention (model/mla.py)
            self.mla = LatentAttention(cfg.mla, h, cfg.num_heads, cfg.qkv_bias)
        else:
            self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=cfg.qkv_bias)
            self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias)
            self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias)
            self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=cfg.o_bias)
        if cfg.attention_sinks:
            self.sinks = nn.Parameter(torch.empty(cfg.num_heads))
        if cfg.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(d, cfg.rms_norm_eps), RMSNorm(d, cfg.rms_norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(cfg.num_heads * d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.num_kv_heads * d, cfg.rms_norm_eps)
        self.use_rope = cfg.use_rope[index]
        freqs, self.rope_scale = rope_frequencies(cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("freqs", freqs, persistent=False)
        self.spec = cfg.attention_spec(index)
        self.is_moe = cfg.moe_layers[index]
        if self.is_moe:
            self.gate = nn.Linear(h, cfg.num_experts, bias=cfg.router_bias)
            if cfg.routing == "sigmoid_group":  # chooses experts, never trained by gradient
                self.gate_correction = nn.Parameter(torch.zeros(cfg.num_experts), requires_grad=False)
            self.experts = expert_bank(cfg, range(cfg.num_experts) if experts is None else experts)
            if cfg.shared_expert_intermediate_size:
                self.shared_expert = DenseMLP(h, cfg.shared_expert_intermediate_size)
            if cfg.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(h, 1, bias=False)
        else:
            self.mlp = DenseMLP(h, cfg.dense_intermediate_size)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, attention: "Attention",
                experts: "Dispatch | None" = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """x [T, H] at positions [T] -> (x [T', H], router logits [T', E] | None, kept rows | None).

        attention(layer, q, k, v) -> (attn [T', Hq, D], lse [T', Hq] | None, kept): the merged
        attention and its log-sum-exp (needed where the layer has sinks); `kept` (row indices, or None for
        all) lets a caller drop rows whose output nobody needs (a context segment's last layer).
        experts(layer, rows [P, H], expert ids [P]) -> a function returning expert outputs [P, H]
        (called after the shared expert, so remote experts overlap it); None: this layer's own bank.
        """
        q, k, v = self.qkv(self.attn_norm(x), pos)
        attn, lse, kept = attention(self, q, k, v)
        if kept is not None:
            x = x[kept]
        x = self.attn_out(x, self.sink(attn, lse))
        y, router_logits = self.feed_forward(self.mlp_norm(x), experts)
        return x + y, router_logits, kept

    # -- attention ------------------------------------------------------------------------
    def qkv(self, h: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normed hidden h [T, H], positions [T] -> q [T, Hq, D], k, v [T, Hkv, D]."""
        cfg, t = self.cfg, h.shape[0]
        if cfg.mla is not None:
            return self.mla.qkv(h, pos, self.freqs, cfg.rope_style, self.rope_scale)
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        if cfg.qk_norm == "full":  # OLMoE: norm over the whole projection
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.clip_qkv is not None:
            q, k, v = (z.clamp(-cfg.clip_qkv, cfg.clip_qkv) for z in (q, k, v))
        q = q.view(t, cfg.num_heads, cfg.head_dim)
        k = k.view(t, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm == "head":  # Qwen3-MoE: per-head norm before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            cos, sin = rope_tables(pos, self.freqs, self.rope_scale, q.device)  # once for q and k
            q, k = rotate(q, cos, sin, cfg.rope_style), rotate(k, cos, sin, cfg.rope_style)
            if cfg.qk_norm == "l2":  # Llama-4: weightless RMS norm after RoPE, RoPE layers only
                q, k = rms(q, cfg.rms_norm_eps), rms(k, cfg.rms_norm_eps)
        elif cfg.attn_temperature_tuning:  # Llama-4 NoPE layers: position-dependent temperature
            scale = torch.log1p(torch.floor((pos.float() + 1.0) / cfg.floor_scale)) * cfg.attn_scale + 1.0
            q = (q * scale[:, None, None]).to(q.dtype)
        return q, k, v

    def sink(self, attn: torch.Tensor, lse: torch.Tensor | None) -> torch.Tensor:
        """Merged attention [T, Hq, D] with its LSE [T, Hq] -> the attention with this layer's sinks
        in the softmax denominator (identity without sinks): exp(lse) / (exp(lse) + exp(sink))."""
        if not hasattr(self, "sinks"):
            return attn
        if lse is None:
            raise ValueError(f"layer {self.index} has attention sinks: its attention must return the LSE")
        w = torch.sigmoid(lse.float() - self.sinks.float())  # [T, Hq]; lse = -inf (no key) -> 0
        return (attn.float() * w[..., None]).to(attn.dtype)

    def attn_out(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual x [T, H] + o_proj(attn [T, Hq, D])."""
        if self.cfg.mla is not None:
            return x + self.mla.out(attn).to(x.dtype)
        return x + self.o_proj(attn.flatten(1).to(x.dtype))

    # -- feed-forward ---------------------------------------------------------------------
    def gate_route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normed hidden [T, H] -> (router logits [T, E], experts [T, k], weights [T, k])."""
        if self.cfg.routing == "sigmoid_group":  # DeepSeek-V3 scores experts in fp32 whatever the dtype
            logits = F.linear(h.float(), self.gate.weight.float())
        else:
            logits = self.gate(h)
        experts, weights = route(logits, self.cfg, getattr(self, "gate_correction", None))
        return logits, experts, weights

    def feed_forward(self, h: torch.Tensor, experts: "Dispatch | None" = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normed hidden h [T, H] -> (y [T, H], router logits [T, E] | None for a dense layer)."""
        if not self.is_moe:
            return self.mlp(h), None
        logits, chosen, weights = self.gate_route(h)
        token, expert, in_scale, out_w = dispatch_pairs(chosen, weights, self.cfg)  # [P]
        rows = h[token] * in_scale[:, None].to(h.dtype)  # [P, H]
        pending = experts(self, rows, expert) if experts is not None else (lambda: self.experts(rows, expert))
        shared = self.shared(h)  # while remote experts work
        y_pairs = pending().to(h.dtype) * out_w[:, None].to(h.dtype)
        y = torch.zeros_like(h).index_add_(0, token, y_pairs)
        return (y if shared is None else y + shared), logits

    def shared(self, h: torch.Tensor) -> torch.Tensor | None:
        """Shared-expert output [T, H] (gated where the architecture gates it), or None."""
        if not hasattr(self, "shared_expert"):
            return None
        y = self.shared_expert(h)
        if hasattr(self, "shared_expert_gate"):
            y = torch.sigmoid(self.shared_expert_gate(h)) * y
        return y


Attention = Callable[[DecoderLayer, torch.Tensor, torch.Tensor, torch.Tensor],
                     tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]
Dispatch = Callable[[DecoderLayer, torch.Tensor, torch.Tensor], Callable[[], torch.Tensor]]


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids]


def init_weights(module: nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Deterministic random init (normal(0, std) matrices, ones for norms)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters()):
        with torch.no_grad():
            if name.endswith("norm.weight") or "norm." in name and p.dim() == 1:
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def tokens_per_expert(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.bincount(experts.reshape(-1), minlength=num_experts)

