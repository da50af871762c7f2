"""The single-process MoE transformer: `model(ids) -> logits`.

It runs the same layer steps the mesh distributes (see block.py), all in one process.
"""

from __future__ import annotations

import torch
from torch import nn

from expertmesh.model.attention import partial_attention
from expertmesh.model.block import DecoderLayer, Embedding
from expertmesh.model.config import ModelConfig
from expertmesh.model.norm import RMSNorm


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig, experts: range | None = None, with_experts: bool = True) -> None:
        """experts: subset of expert ids to hold in every MoE layer (None: all).

        with_experts=False builds the dense part only (the router's share of the weights).
        """
        super().__init__()
        self.cfg = cfg
        held = experts if with_experts else range(0)
        self.embed = Embedding(cfg)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, held) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final hidden [T, H] -> logits [T, V] fp32."""
        return self.lm_head(self.norm(x)).float()

    def forward(self, ids: torch.Tensor, return_router_logits: bool = False):
        """ids [T] or [1, T] -> logits [T, V] (and router logits per MoE layer)."""
        ids = ids.reshape(-1).to(self.embed.weight.device)
        pos = torch.arange(ids.shape[0], device=ids.device)
        x = self.embed(ids)  # [T, H]
        router_logits = []

        def attention(layer: DecoderLayer, q, k, v):  # causal self-attention, in place
            return (*partial_attention(q, pos, k, v, pos, layer.spec), None)

        for layer in self.layers:
            x, rl, _ = layer(x, pos, attention)
            if rl is not None:
                router_logits.append(rl)
        out = self.logits(x)
        return (out, router_logits) if return_router_logits else out
