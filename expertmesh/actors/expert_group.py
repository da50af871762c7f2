"""ExpertGroup: holds a contiguous subset of the experts of every MoE layer.

The router sends only the (token row, expert) pairs routed to this group's experts; the group
runs grouped expert compute (one matmul per expert touched) and counts tokens per expert.
backend="jax" holds the experts as JAX arrays on the actor's JAX device and computes with
`expertmesh.jax_backend.experts` (same checkpoint files, same answers).
The class is plain Python; `RemoteExpertGroup` is the Ray actor of it.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import ray
import torch

from expertmesh.jax_backend import check_backend, configure_jax
from expertmesh.actors.step_worker import StepWorker
from expertmesh.model.checkpoint import load_experts
from expertmesh.model.device import resolve_device, resolve_dtype

# Arrays from Ray's object store are read-only views; these modules only read them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


class ExpertGroup(StepWorker):
    def __init__(self, checkpoint: str, index: int, experts: range, num_threads: int | None = None,
                 backend: str = "torch", device: str = "cpu", dtype: str = "float32") -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = self.data_device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.index, self.experts, self.backend = index, experts, check_backend("expert_backend", backend)
        if backend == "jax":
            configure_jax(num_threads)
            from expertmesh.jax_backend.experts import load_banks

            self.banks = load_banks(checkpoint, experts)  # {layer: JaxExpertBank}
        else:
            self.banks = load_experts(checkpoint, experts, dtype=self.dtype, device=self.device)  # {layer: ExpertBank}
        self.tokens = {layer: np.zeros(len(experts), dtype=np.int64) for layer in self.banks}
        self._lock = threading.Lock()

    def ping(self) -> tuple[int, int, int]:
        return self.index, self.experts.start, self.experts.stop

    def compute(self, layer: int, x: np.ndarray, experts: np.ndarray) -> np.ndarray:
        """x [P, H] rows, experts [P] (global ids held here) -> expert outputs [P, H] (fp32 numpy)."""
        y = self.compute_tensors(layer, torch.from_numpy(np.asarray(x)), torch.from_numpy(np.asarray(experts)).long())
        return y.cpu().numpy()

    @torch.no_grad()
    def compute_tensors(self, layer: int, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """`compute` on tensors (the collective data plane: rows may already be on this group's
        device, and the outputs stay there): fp32 [P, H]."""
        if layer not in self.banks:
            raise ValueError(f"layer {layer} is not an MoE layer; MoE layers: {sorted(self.banks)}")
        local = experts.cpu().numpy() - self.experts.start
        if len(local) and (local.min() < 0 or local.max() >= len(self.experts)):
            raise ValueError(f"expert group {self.index} holds experts {self.experts.start}.."
                             f"{self.experts.stop - 1}; got {int(experts.min())}..{int(experts.max())}")
        with self._lock:
            self.tokens[layer] += np.bincount(local, minlength=len(self.experts))
        if self.backend == "jax":
            e = experts.cpu().numpy()
            return torch.from_numpy(np.asarray(self.banks[layer](x.float().cpu().numpy(), e)))
        return self.banks[layer](x.to(self.device, self.dtype), experts.to(self.device)).float()

    def stats(self) -> dict:
        with self._lock:
            out = {"index": self.index, "backend": self.backend, "experts": [self.experts.start, self.experts.stop],
                   "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                   "tokens_per_expert": {layer: t.tolist() for layer, t in self.tokens.items()}}
        if self.backend == "jax":
            from expertmesh.jax_backend.experts import compilations

            out["jax"] = {"compilations": compilations()}
        return out


RemoteExpertGroup = ray.remote(ExpertGroup)
