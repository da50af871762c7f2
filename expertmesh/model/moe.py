"""MoE routing (the gate) and grouped expert compute.

Routing turns gate logits into (expert index, weight) pairs per token, exactly as each
reference architecture does. Expert compute takes (token row, expert) pairs, sorts them by
expert and runs one matmul per expert touched: no per-token Python loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.model.config import ModelConfig


def route(logits: torch.Tensor, cfg: ModelConfig, correction: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate logits [T, E] -> (experts [T, k] int64, weights [T, k] fp32).

    correction [E]: DeepSeek-V3's score correction bias (it picks experts, it does not weight them)."""
    if cfg.routing == "sigmoid_group":  # DeepSeek-V3 (noaux_tc): best groups first, then top-k in them
        scores = torch.sigmoid(logits.float())
        choice = scores if correction is None else scores + correction.float()
        t, g = choice.shape[0], cfg.n_group
        group_scores = choice.view(t, g, choice.shape[1] // g).topk(2, dim=-1).values.sum(-1)  # [T, G]
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, torch.topk(group_scores, cfg.topk_group, dim=-1, sorted=False).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(choice.shape[1] // g, dim=1), float("-inf"))
        idx = torch.topk(choice, cfg.top_k, dim=-1, sorted=False).indices
        top = scores.gather(1, idx)
        if cfg.norm_topk_prob:
            top = top / (top.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, top * cfg.routed_scaling_factor
    if cfg.routing == "sigmoid_topk":  # Llama-4: top-k on logits, sigmoid of the chosen
        top, idx = torch.topk(logits, cfg.top_k, dim=-1)
        return idx, torch.sigmoid(top.float())
    if cfg.routing == "topk_softmax":  # GPT-OSS: top-k on logits, softmax over the chosen
        top, idx = torch.topk(logits, cfg.top_k, dim=-1)
        return idx, F.softmax(top.float(), dim=-1)
    probs = F.softmax(logits.float(), dim=-1)  # [T, E]
    top, idx = torch.topk(probs, cfg.top_k, dim=-1)  # [T, k]
    if cfg.norm_topk_prob:
        top = top / top.sum(dim=-1, keepdim=True)
    return idx, top


class ExpertBank(nn.Module):
    """SwiGLU experts `first .. first+count-1` of one MoE layer, stacked.

    gate/up [E, I, H], down [E, H, I] (nn.Linear orientation); with `bias`, gate_bias/up_bias
    [E, I] and down_bias [E, H]. `clamp` = (alpha, limit) selects GPT-OSS's clamped SwiGLU:
    (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g) with g = min(gate, limit).
    """

    def __init__(self, count: int, hidden: int, inter: int, first: int = 0, bias: bool = False,
                 clamp: tuple[float, float] | None = None) -> None:
        super().__init__()
        self.first = first
        self.count = count
        self.clamp = clamp
        self.gate = nn.Parameter(torch.empty(count, inter, hidden))
        self.up = nn.Parameter(torch.empty(count, inter, hidden))
        self.down = nn.Parameter(torch.empty(count, hidden, inter))
        if bias:
            self.gate_bias = nn.Parameter(torch.empty(count, inter))
            self.up_bias = nn.Parameter(torch.empty(count, inter))
            self.down_bias = nn.Parameter(torch.empty(count, hidden))

    @property
    def has_bias(self) -> bool:
        return "gate_bias" in self._parameters  # (hasattr on a module raises and catches inside: slow)

    def act(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Gate and up projections [n, I] -> the gated hidden [n, I]."""
        if self.clamp is None:
            return F.silu(g) * u
        alpha, limit = self.clamp
        g = g.clamp(max=limit)
        return (u.clamp(-limit, limit) + 1) * (g * torch.sigmoid(g * alpha))

    def forward(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x [N, H] rows, experts [N] global expert ids held here -> y [N, H]."""
        local = experts - self.first  # [N]
        if len(x) == 1:  # one row (a batch-1 decode step with top-1): no sort, no scatter, no loop
            return self.expert(x, int(local[0]))
        order = torch.argsort(local, stable=True)
        counts = torch.bincount(local, minlength=self.count)  # [E]
        xs = x[order]  # [N, H] sorted by expert
        ys = None
        if use_grouped_mm(xs):
            try:
                ys = self.grouped(xs, counts)
            except RuntimeError:  # a GPU or shape the grouped kernel does not take: the loop below
                ys = None
        if ys is None:
            ys = self.looped(xs, counts.tolist())
        y = torch.empty_like(ys)
        y[order] = ys
        return y

    def looped(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Rows xs [N, H] sorted by expert, counts per local expert -> [N, H]: one matmul per expert."""
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            ys[start:start + n] = self.expert(xs[start:start + n], e)
            start += n
        return ys

    def expert(self, rows: torch.Tensor, e: int) -> torch.Tensor:
        """Rows [n, H] through local expert e -> [n, H]."""
        g, u = rows @ self.gate[e].T, rows @ self.up[e].T  # [n, I]
        if self.has_bias:
            g, u = g + self.gate_bias[e], u + self.up_bias[e]
        y = self.act(g, u) @ self.down[e].T
        return y + self.down_bias[e] if self.has_bias else y

    def grouped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The same with `torch._grouped_mm` (one kernel per matrix, no host sync): xs [N, H] -> [N, H]."""
        offs = torch.cumsum(counts, 0).to(torch.int32)  # [E] end row of each expert
        g = torch._grouped_mm(xs, self.gate.transpose(1, 2), offs=offs)  # [N, I]
        u = torch._grouped_mm(xs, self.up.transpose(1, 2), offs=offs)  # [N, I]
        if self.has_bias:
            row_expert = torch.repeat_interleave(torch.arange(self.count, device=xs.device), counts,
                                                 output_size=xs.shape[0])
            g, u = g + self.gate_bias[row_expert], u + self.up_bias[row_expert]
        y = torch._grouped_mm(self.act(g, u), self.down.transpose(1, 2), offs=offs)  # [N, H]
        return y + self.down_bias[row_expert] if self.has_bias else y


def expert_bank(cfg: ModelConfig, held: range) -> ExpertBank:
    """The bank of experts `held` of one MoE layer of this architecture."""
    return ExpertBank(len(held), cfg.hidden_size, cfg.moe_intermediate_size, first=held.start if len(held) else 0,
                      bias=cfg.expert_bias, clamp=cfg.swiglu_clamp)


def use_grouped_mm(x: torch.Tensor) -> bool:
    """Grouped expert matmuls where they pay: bf16 on CUDA with a torch that has `_grouped_mm`."""
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


class DenseMLP(nn.Module):
    """SwiGLU MLP: the shared expert and the dense layers."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def dispatch_pairs(experts: torch.Tensor, weights: torch.Tensor, cfg: ModelConfig
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten top-k choices into (token, expert) pairs.

    experts/weights [T, k] -> token [P], expert [P], in_scale [P], out_weight [P] with P = T*k.
    Llama-4 scales the expert input by the score (out weight 1); the others weight the output.
    """
    t, k = experts.shape
    token = torch.arange(t, device=experts.device).repeat_interleave(k)
    expert = experts.reshape(-1)
    w = weights.reshape(-1).float()
    ones = torch.ones_like(w)
    return (token, expert, w, ones) if cfg.expert_input_scaling else (token, expert, ones, w)


def expert_partition(num_experts: int, groups: int) -> list[range]:
    """Contiguous, balanced split of expert ids over expert groups."""
    if not 1 <= groups <= num_experts:
        raise ValueError(f"expert_groups ({groups}) must be in 1..num_experts ({num_experts})")
    base, extra = divmod(num_experts, groups)
    out, start = [], 0
    for g in range(groups):
        n = base + (1 if g < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out
