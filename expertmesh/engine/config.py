"""What a step engine is built with: a frozen config, and the narrow view of the router's
contexts it reads (their owner, actors/router/contexts.py, implements it; the engine never
changes them)."""

from __future__ import annotations

import dataclasses
from typing import Mapping, Protocol

import torch


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """durable: the contexts' segments are store files, so a lost shard's are served by the
    others (takeover.py); without a store they died with it. micro_batches: 1, or 2 to run a
    step's requests as two halves in ping-pong (ping_pong.py). whole_steps: send a step whole to
    the one actor holding every shard and group, where the exchange has one (whole_step.py)."""

    durable: bool = False
    micro_batches: int = 1
    whole_steps: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.durable, bool):
            raise ValueError(f"durable must be True or False, got {self.durable!r}")
        if self.micro_batches not in (1, 2) or isinstance(self.micro_batches, bool):
            raise ValueError(f"micro_batches must be 1 or 2, got {self.micro_batches!r}")


class ContextView(Protocol):
    """What a step reads of the contexts."""

    summaries: Mapping[str, Mapping[int, list[tuple[torch.Tensor, torch.Tensor] | None]]]
    """context id -> shard -> [layer] (kmin [P, Hkv, D], kmax [P, Hkv, D]) of its segment's pages"""

    def shard_tokens(self) -> list[int]:
        """Context tokens held per shard of the mesh (one entry per shard): who stands in for a
        lost shard."""
        ...

    def foreign_shards(self) -> set[int]:
        """Shard indices past the mesh's that stored contexts name (stored by a bigger mesh):
        served like a lost shard's until `rebalance` moves them."""
        ...
