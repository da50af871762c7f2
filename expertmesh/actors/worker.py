"""A colocated mesh worker: one context shard and one expert group in the same actor.

How real deployments use an accelerator: attention over a share of the context and a share of
the experts on every GPU. One process and one exchange target per device instead of two; the
router's plan gives such an actor both kinds of exchange in a step (see step_plan.Part).
The worker is a context shard (any backend) that also answers `compute` for its experts.
"""

from __future__ import annotations

import functools

import numpy as np
import ray

from expertmesh.actors.context_shard import ContextShard
from expertmesh.actors.expert_group import ExpertGroup


@functools.cache
def colocated_worker(shard_cls: type = ContextShard) -> type:
    """The worker class over a context shard class (torch or JAX backend)."""

    class MeshWorker(shard_cls):
        def __init__(self, shard_args: tuple, group_args: tuple | None) -> None:
            """shard_args: the context shard's constructor arguments; group_args: the expert
            group's (None: this worker holds no experts, when there are more shards than groups)."""
            super().__init__(*shard_args)
            self.group = ExpertGroup(*group_args) if group_args is not None else None

        def compute(self, layer: int, x: np.ndarray, experts: np.ndarray) -> np.ndarray:
            if self.group is None:
                raise ValueError(f"worker {self.index} holds no experts")
            return self.group.compute(layer, x, experts)

        def compute_tensors(self, layer: int, x, experts):
            if self.group is None:
                raise ValueError(f"worker {self.index} holds no experts")
            return self.group.compute_tensors(layer, x, experts)

        def adopt_experts(self, start: int, stop: int, router: str = "") -> int:
            if self.group is None:
                raise ValueError(f"worker {self.index} holds no experts")
            return self.group.adopt_experts(start, stop, router)

        def release_experts(self, start: int, stop: int, router: str = "") -> bool:
            return self.group is not None and self.group.release_experts(start, stop, router)

        def hold(self, placement):
            if self.group is None:
                raise ValueError(f"worker {self.index} holds no experts")
            return self.group.hold(placement)

        def group_spec(self) -> tuple:
            if self.group is None:
                raise ValueError(f"worker {self.index} holds no experts")
            return self.group.group_spec()

        def settle(self, version: int) -> int:
            return self.group.settle(version) if self.group is not None else 0

        def expert_placement(self):
            return self.group.expert_placement() if self.group is not None else None

        def group_stats(self) -> dict:
            return self.group.stats() if self.group is not None else {}

    MeshWorker.__name__ = MeshWorker.__qualname__ = f"MeshWorker[{shard_cls.__name__}]"
    return MeshWorker


@functools.cache
def remote_worker(shard_cls: type = ContextShard):
    return ray.remote(colocated_worker(shard_cls))
