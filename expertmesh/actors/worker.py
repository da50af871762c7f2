"""A colocated mesh worker: one context shard and one expert group in the same actor.

How real deployments use an accelerator: attention over a share of the context and a share of
the experts on every GPU. One process and one exchange target per device instead of two; the
router's plan gives such an actor both kinds of exchange in a step (see step_plan.Part).
The worker is a context shard (any backend) that also answers `compute` for its experts. Where it
holds every shard and group of the mesh, the router sends it whole steps (engine/whole_step.py):
it then runs the model's dense layers too (loaded at the first such step) over its own shard and
group in process, one round trip a step.
"""

from __future__ import annotations

import functools
import threading

import numpy as np
import ray
import torch

from expertmesh.actors.context_shard import ContextShard
from expertmesh.actors.expert_group import ExpertGroup
from expertmesh.dataplane.local import LocalExchange
from expertmesh.dataplane.wire import encode_error
from expertmesh.dataplane.wire_whole import encode_meta
from expertmesh.engine.step_host import StepHost
from expertmesh.engine.whole_step import WholeRequest
from expertmesh.model.checkpoint import load_model


@functools.cache
def colocated_worker(shard_cls: type = ContextShard) -> type:
    """The worker class over a context shard class (torch or JAX backend)."""

    class MeshWorker(shard_cls):
        def __init__(self, shard_args: tuple, group_args: tuple | None) -> None:
            """shard_args: the context shard's constructor arguments; group_args: the expert
            group's (None: this worker holds no experts, when there are more shards than groups)."""
            super().__init__(*shard_args)
            self.group = ExpertGroup(*group_args) if group_args is not None else None
            self._hosts: dict[str, StepHost] = {}  # router -> its whole steps here
            self._dense = None  # the model without its experts, loaded at the first whole step
            self._dense_lock = threading.Lock()

        @torch.no_grad()
        def run_whole(self, pg, req: WholeRequest, router: str) -> None:
            """Run the step whole; answer int64 [0, meta bytes, rows], the meta, the logits (or
            [1, error bytes, 0], the error: the router raises it, this loop goes on)."""
            try:
                if self.group is None:
                    raise ValueError(f"worker {self.index} holds no experts: it cannot compute whole steps")
                host = self._hosts.get(router)
                if host is None or host.incarnation != req.incarnation:  # a new router: its last mirrors go
                    host = self._hosts[router] = StepHost(self._model(), LocalExchange(self, self.group),
                                                          [self.group.experts], req.incarnation)
                vocab = host.engine.cfg.vocab_size
                for s in req.seqs:
                    if int(s.token_ids.min()) < 0 or int(s.token_ids.max()) >= vocab:
                        raise ValueError(f"token ids must lie in [0, {vocab}); sequence {s.key!r} has "
                                         f"{int(s.token_ids.min())}..{int(s.token_ids.max())}")
                reply = host.run(req)
                meta = encode_meta(reply)
                logits = reply.logits.float().cpu().contiguous()
            except Exception as exc:  # noqa: BLE001 - answered in band; the step fails at the router
                data = encode_error(exc)
                pg.send([torch.tensor([1, len(data), 0], dtype=torch.int64),
                         torch.frombuffer(bytearray(data), dtype=torch.uint8)], 0, 0)
                return
            pg.send([torch.tensor([0, len(meta), logits.shape[0]], dtype=torch.int64),
                     torch.frombuffer(bytearray(meta), dtype=torch.uint8), logits], 0, 0)

        def _model(self):
            with self._dense_lock:
                if self._dense is None:
                    self._dense = load_model(self.group.checkpoint, with_experts=False, dtype=self.group.dtype,
                                             device=self.group.device).requires_grad_(False)
                return self._dense

        def whole_stats(self) -> dict:
            """Whole steps' mirrors: sequences held and recomputed, per router."""
            return {r: {"sequences": len(h.seqs), "recomputed": h.recomputed, "steps": h.steps,
                        "step_seconds": h.seconds} for r, h in self._hosts.items()}

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
