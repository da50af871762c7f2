"""One training step and the state around it, shared by the Ray Train workers and the plain
single-process loop (the benchmark baseline): batch collation, model and optimizer, the loss,
and checkpoints in Hugging Face layout (plus the optimizer state, as safetensors).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from expertmesh.model.batched import forward_batch
from expertmesh.model.block import init_weights
from expertmesh.model.checkpoint import load_model, save_model
from expertmesh.model.config import ModelConfig
from expertmesh.model.default import DEFAULT_HF_CONFIG
from expertmesh.model.losses import expert_load, load_balancing_loss, router_z_loss, token_loss
from expertmesh.model.transformer import MoETransformer
from expertmesh.pipelines.train_config import TrainConfig

PAD_ID = 0


def collate(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Rows {input_ids: list/array of ids, answer_start, answer_len} -> padded tensors.

    ids [B, T], targets [B, T] (next token), answer [B, T] (1 where the target is an answer
    token), mask [B, T] (1 on real tokens).
    """
    rows = [np.asarray(r, dtype=np.int64) for r in batch["input_ids"]]
    t = max(len(r) for r in rows)
    b = len(rows)
    ids = np.full((b, t), PAD_ID, dtype=np.int64)
    mask = np.zeros((b, t), dtype=np.float32)
    answer = np.zeros((b, t), dtype=np.float32)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
        a = int(batch["answer_start"][i])
        answer[i, a - 1:a - 1 + int(batch["answer_len"][i])] = 1  # position a-1 predicts token a
    targets = np.roll(ids, -1, axis=1)
    targets[:, -1] = PAD_ID
    valid = np.roll(mask, -1, axis=1)
    valid[:, -1] = 0
    return {"ids": torch.from_numpy(ids), "targets": torch.from_numpy(targets),
            "answer": torch.from_numpy(answer), "valid": torch.from_numpy(valid), "mask": torch.from_numpy(mask)}


def build_model(cfg: TrainConfig) -> MoETransformer:
    model = _build_model(cfg)
    if cfg.train_only:  # the rest is frozen: no gradient, no optimizer update (its saved moments are kept)
        names = [n for n, _ in model.named_parameters()]
        for prefix in cfg.train_only:
            if not any(n.startswith(prefix) for n in names):
                raise ValueError(f"train_only: no parameter name starts with {prefix!r}; names are like "
                                 f"{names[0]!r}, 'layers.0.q_proj.weight' (layers 0..{len(model.layers) - 1})")
        for name, p in model.named_parameters():
            if not name.startswith(tuple(cfg.train_only)):
                p.requires_grad_(False)
    return model


def _build_model(cfg: TrainConfig) -> MoETransformer:
    if cfg.init_from or cfg.resume_from:  # resume_from: load_state then restores optimizer and step too
        model = load_model(cfg.init_from or cfg.resume_from)
        if cfg.model:
            raise ValueError("give either init_from (fine-tuning) or model overrides, not both")
        model = model.float().train().requires_grad_(True)
        for layer in model.layers:  # DeepSeek-V3's correction bias chooses experts; no gradient reaches it
            if hasattr(layer, "gate_correction"):
                layer.gate_correction.requires_grad_(False)
        return model
    hf = {**DEFAULT_HF_CONFIG, **cfg.model}
    model = MoETransformer(ModelConfig.from_hf(hf))
    init_weights(model, seed=cfg.seed)
    return model.train()


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "norm" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


@dataclasses.dataclass
class StepResult:
    loss: float
    answer_loss: float
    lm_loss: float
    aux_loss: float
    z_loss: float
    answer_accuracy: float  # share of answer tokens predicted right (greedy, teacher forced)
    tokens: int
    expert_tokens: np.ndarray  # [E] tokens routed per expert, summed over layers


def step(model: nn.Module, core: MoETransformer, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
         cfg: TrainConfig, step_index: int, device: torch.device) -> StepResult:
    """Forward, loss, backward, clip, update. `model` may be a DDP wrapper of `core`."""
    mcfg = core.cfg
    b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step_index, cfg)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp_bf16 and device.type == "cuda"):
        logits, router_logits = model(b["ids"])
    answer_w = b["answer"]
    lm_w = b["valid"] * (1 - answer_w)
    answer_loss = token_loss(logits, b["targets"], answer_w)
    lm_loss = token_loss(logits, b["targets"], lm_w)
    loss = answer_loss + cfg.lm_weight * lm_loss
    aux = z = torch.zeros((), device=device)
    if router_logits:
        coef = mcfg.router_aux_loss_coef if cfg.router_aux_loss_coef is None else cfg.router_aux_loss_coef
        aux = load_balancing_loss(router_logits, mcfg.num_experts, mcfg.top_k, b["mask"])
        loss = loss + coef * aux
        if cfg.router_z_loss_coef:
            z = router_z_loss(router_logits, b["mask"])
            loss = loss + cfg.router_z_loss_coef * z
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    with torch.no_grad():
        hit = (logits.argmax(-1) == b["targets"]).float()
        acc = float((hit * answer_w).sum() / answer_w.sum().clamp(min=1))
        load = expert_load(router_logits, mcfg.num_experts, mcfg.top_k).cpu().numpy() if router_logits \
            else np.zeros(0, dtype=np.int64)
    return StepResult(float(loss.detach()), float(answer_loss.detach()), float(lm_loss.detach()), float(aux.detach()),
                      float(z.detach()), acc,
                      int(b["mask"].sum()), load)


class BatchedModel(nn.Module):
    """`forward(ids [B, T])` -> (logits, router logits): the module DDP wraps."""

    def __init__(self, core: MoETransformer) -> None:
        super().__init__()
        self.core = core

    def forward(self, ids: torch.Tensor):
        return forward_batch(self.core, ids)


# -- checkpoints --------------------------------------------------------------------------

def save_state(core: MoETransformer, optimizer: torch.optim.Optimizer, step_index: int, path: str | os.PathLike,
               extra: dict | None = None) -> Path:
    """Hugging Face model directory + optimizer.safetensors + trainer_state.json (no pickle)."""
    from safetensors.torch import save_file

    root = save_model(core, path)
    names = {id(p): n for n, p in core.named_parameters()}
    tensors, scalars = {}, {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            n = names[id(p)]
            for key, value in st.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    tensors[f"{n}::{key}"] = value.detach().float().cpu().contiguous()
                else:
                    scalars[f"{n}::{key}"] = float(value)
    if tensors:
        save_file(tensors, str(root / "optimizer.safetensors"))
    (root / "trainer_state.json").write_text(json.dumps({"step": step_index, "optimizer_scalars": scalars,
                                                         **(extra or {})}, indent=1))
    return root


def load_state(core: MoETransformer, optimizer: torch.optim.Optimizer, path: str | os.PathLike,
               device: torch.device) -> int:
    """Restore weights and optimizer state written by `save_state`; returns the step to resume at."""
    from safetensors import safe_open

    root = Path(path)
    loaded = load_model(root)
    core.load_state_dict(loaded.state_dict())
    state = json.loads((root / "trainer_state.json").read_text())
    by_name = dict(core.named_parameters())
    opt_file = root / "optimizer.safetensors"
    if opt_file.is_file():
        with safe_open(str(opt_file), "pt") as f:
            for key in f.keys():
                n, slot = key.split("::")
                optimizer.state[by_name[n]][slot] = f.get_tensor(key).to(device)
    for key, value in state["optimizer_scalars"].items():
        n, slot = key.split("::")
        optimizer.state[by_name[n]][slot] = torch.tensor(value)
    return int(state["step"])
