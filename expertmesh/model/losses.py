"""Training losses: token cross-entropy, the router load-balancing loss, the router z-loss.

`load_balancing_loss` computes exactly what Hugging Face's `load_balancing_loss_func`
(Switch Transformer eq. 4-6, as Mixtral/Qwen-MoE/OLMoE train with it) computes on the same
router logits: softmax over experts, top-k assignment fractions times mean router
probabilities, summed, times the number of experts; padding excluded by the attention mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """router_logits: per MoE layer [N, E] (N = batch*seq rows); attention_mask [batch, seq] or None."""
    device = router_logits[0].device
    counts = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probs = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    mask = None if attention_mask is None else attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
    for logits in router_logits:
        p = F.softmax(logits.float(), dim=-1)  # [N, E]
        chosen = torch.topk(p, top_k, dim=-1).indices.reshape(-1)  # [N*k]
        w = torch.ones(len(p), device=device) if mask is None else mask
        counts = counts + torch.zeros_like(counts).scatter_add_(0, chosen, w.repeat_interleave(top_k))
        probs = probs + (p * w[:, None]).sum(dim=0)
        rows = rows + w.sum()
    return torch.sum((counts / rows) * (probs / rows)) * num_experts


def router_z_loss(router_logits: list[torch.Tensor], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens and layers of logsumexp(router logits)^2."""
    z = torch.stack([torch.logsumexp(l.float(), dim=-1) ** 2 for l in router_logits])  # [L, N]
    if attention_mask is None:
        return z.mean()
    m = attention_mask.reshape(-1).to(z.dtype)
    return (z * m).sum() / (m.sum() * len(router_logits)).clamp(min=1)


def token_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean next-token cross-entropy. logits [B, T, V], targets/weights [B, T] (0: ignored)."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    w = weights.reshape(-1).to(ce.dtype)
    return (ce * w).sum() / w.sum().clamp(min=1e-9)


def expert_load(router_logits: list[torch.Tensor], num_experts: int, top_k: int) -> torch.Tensor:
    """Tokens routed to each expert, summed over layers: [E] (top-k of the logits)."""
    counts = torch.zeros(num_experts, dtype=torch.long, device=router_logits[0].device)
    for logits in router_logits:
        counts += torch.bincount(torch.topk(logits, top_k, dim=-1).indices.reshape(-1), minlength=num_experts)
    return counts
