"""A checkpoint with hot experts: its MoE routers' rows for some experts raised, so most tokens
pick them (a skewed expert load, as a real model's hot experts; the expert-balancing benchmark's
and tests' workload). The rest of the model is untouched."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# router (gate) weights [experts, hidden] of the architectures with routed experts
ROUTER_WEIGHTS = ("block_sparse_moe.gate.weight", "mlp.gate.weight", "feed_forward.router.weight")


def with_hot_experts(checkpoint: str | os.PathLike, into: str | os.PathLike, experts: tuple[int, ...] = (0, 1),
                     by: float = 0.5) -> str:
    """A copy of `checkpoint` in `into` whose routers' rows for `experts` are raised by `by` times
    the mean magnitude of the router's weights; its path."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(checkpoint, into)
    for f in Path(into).glob("*.safetensors"):
        tensors = load_file(f)
        for name, t in tensors.items():
            if name.endswith(ROUTER_WEIGHTS):
                tensors[name] = t.clone()
                tensors[name][list(experts)] += by * t.abs().mean()
        save_file(tensors, f, metadata={"format": "pt"})
    return str(into)
