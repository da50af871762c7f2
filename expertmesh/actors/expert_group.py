"""ExpertGroup: holds a contiguous subset of the experts of every MoE layer.

The router sends only the (token row, expert) pairs routed to this group's experts; the group
runs grouped expert compute (one matmul per expert touched) and counts tokens per expert.
backend="jax" holds the experts as JAX arrays on the actor's JAX device and computes with
`expertmesh.jax_backend.experts` (same checkpoint files, same answers).
The class is plain Python; `RemoteExpertGroup` is the Ray actor of it.
"""

from __future__ import annotations

import os
import threading
import time
import warnings

import numpy as np
import ray
import torch

from expertmesh.dataplane.step_worker import StepWorker
from expertmesh.engine.expert_placement import ExpertPlacement
from expertmesh.errors import CapacityError
from expertmesh.jax_backend import check_backend, configure_jax
from expertmesh.model.checkpoint import load_experts, resolve_checkpoint
from expertmesh.model.config import ModelConfig
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
        self.checkpoint = checkpoint
        self.adopted: dict[range, dict] = {}  # a lost group's experts held here too: range -> {layer: bank}
        self.adopt_seconds: dict[str, float] = {}  # "first..last" -> seconds its last adoption took to load
        self.adopters: dict[range, set[str]] = {}  # the routers sending an adopted range's rows here
        # the mesh's expert placement (expert_placement.py): experts it places here beyond this
        # group's own, (layer, expert) -> a one-expert bank; kept for routers that start later
        self.placement: ExpertPlacement | None = None
        self.placed: dict[tuple[int, int], object] = {}
        self.loaded_on_demand = 0  # placed experts loaded at a step (after a restart)
        self.cfg = ModelConfig.from_file(resolve_checkpoint(checkpoint) / "config.json")
        self._args = (checkpoint, index, experts, num_threads, backend, device, dtype)
        self._lock = threading.Lock()

    def ping(self) -> tuple[int, int, int]:
        return self.index, self.experts.start, self.experts.stop

    def group_spec(self) -> tuple:
        """Its constructor arguments (groups added to a running mesh are made alike)."""
        return self._args

    def compute(self, layer: int, x: np.ndarray, experts: np.ndarray) -> np.ndarray:
        """x [P, H] rows, experts [P] (global ids held here) -> expert outputs [P, H] (fp32 numpy)."""
        y = self.compute_tensors(layer, torch.from_numpy(np.asarray(x)), torch.from_numpy(np.asarray(experts)).long())
        return y.cpu().numpy()

    def adopt_experts(self, start: int, stop: int, router: str = "") -> int:
        """Hold experts [start, stop) too (a lost group's, loaded from the checkpoint) until every
        router that asked (`router`: its name) has called `release_experts`: the routers send
        their rows here meanwhile. Returns the experts held."""
        held = range(start, stop)
        if held not in self.adopted and held != self.experts:
            self._check_room(held)
            t0 = time.perf_counter()
            self.adopted[held] = self._load(held)
            self.adopt_seconds[f"{start}..{stop - 1}"] = time.perf_counter() - t0
        self.adopters.setdefault(held, set()).add(router)
        return len(self.experts) + sum(len(r) for r in self.adopted)

    def _check_room(self, held: range, layers: int | None = None, why: str = "take over experts {} of a lost group",
                    fix: str = "bring the lost group's host back") -> None:
        """Refuse experts that would not fit where this group's live, with the numbers, instead
        of loading them into an OOM kill. layers: MoE layers per expert (default: every one)."""
        moe = sum(self.cfg.moe_layers)
        per_layer = 3 * self.cfg.hidden_size * self.cfg.moe_intermediate_size * torch.finfo(self.dtype).bits // 8
        need, free = per_layer * len(held) * (moe if layers is None else layers), free_memory_bytes(self.device)
        if need > ROOM * free:
            raise CapacityError(
                f"expert group {self.index} cannot {why.format(f'{held.start}..{held.stop - 1}')}: "
                f"they need {need / 2**20:,.1f} MiB and {free / 2**20:,.1f} MiB is free on its {self.device} "
                f"(at most {ROOM:.0%} may be used); give expert hosts room for another group's experts, or {fix}")

    def hold(self, placement: ExpertPlacement) -> dict:
        """Compute what the mesh's expert `placement` places here beyond this group's own experts:
        load what is not held yet (what an earlier placement placed here stays until `settle`,
        as routers may still send its rows). Keeps the placement for routers that start later.
        Returns the (layer, expert) banks held beyond its own and the seconds loading took."""
        if self.placement is not None and placement.version < self.placement.version:
            raise ValueError(f"expert placement version {placement.version} is older than the one held "
                             f"({self.placement.version})")
        want = placement.placed(self.index, self.experts)
        new = {(layer, e) for layer, es in want.items() for e in es} - set(self.placed)
        t0 = time.perf_counter()
        if new:
            self._check_room(range(len(new)), layers=1, why="hold {} more (layer, expert) weights the expert "
                             "placement puts here", fix="place fewer experts here (fewer redundant ones)")
        loaded = {}
        for e in sorted({e for _, e in new}):
            layers = {layer for layer, x in new if x == e}
            loaded.update({(layer, e): bank for layer, bank in self._load(range(e, e + 1), layers).items()})
        with self._lock:
            self.placed = {**self.placed, **loaded}
            self.placement = placement
        return {"placed": len(self.placed), "loaded": len(loaded), "seconds": time.perf_counter() - t0}

    def _load_missing(self, layer: int, experts: list[int]) -> None:
        """Experts a router sent rows of that this group does not hold: a group restarted after a
        placement put them here comes back with its own experts only (the placement is the
        routers'); it loads them now from the checkpoint (within its room), once."""
        missing = [e for e in experts if (layer, e) not in self.placed and 0 <= e < self.cfg.num_experts]
        if not missing:
            return
        self._check_room(range(len(missing)), layers=1, why="load {} (layer, expert) weights a router sent rows of",
                         fix="balance the experts again (Mesh.balance_experts)")
        loaded = {(layer, e): self._load(range(e, e + 1), {layer})[layer] for e in missing}
        with self._lock:
            self.placed = {**self.placed, **loaded}
            self.loaded_on_demand += len(loaded)

    def settle(self, version: int) -> int:
        """Every router computes with placement `version`: let go of the weights it no longer
        places here. Returns the (layer, expert) banks held beyond its own."""
        with self._lock:
            if self.placement is not None and self.placement.version == version:
                want = self.placement.placed(self.index, self.experts)
                self.placed = {k: b for k, b in self.placed.items() if k[1] in want.get(k[0], ())}
            return len(self.placed)

    def expert_placement(self) -> ExpertPlacement | None:
        """The newest expert placement this group was given (a starting router takes it)."""
        return self.placement

    def release_experts(self, start: int, stop: int, router: str = "") -> bool:
        """One router no longer sends these experts' rows here; the last one lets them go."""
        held = range(start, stop)
        self.adopters.get(held, set()).discard(router)
        if self.adopters.get(held):
            return False
        self.adopters.pop(held, None)
        return self.adopted.pop(held, None) is not None

    def _load(self, held: range, layers: set[int] | None = None) -> dict:
        if self.backend == "jax":
            from expertmesh.jax_backend.experts import load_banks

            banks = load_banks(self.checkpoint, held)
            return {layer: b for layer, b in banks.items() if layers is None or layer in layers}
        return load_experts(self.checkpoint, held, dtype=self.dtype, device=self.device, layers=layers)

    @torch.no_grad()
    def compute_tensors(self, layer: int, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """`compute` on tensors (the collective data plane: rows may already be on this group's
        device, and the outputs stay there): fp32 [P, H]. Rows of adopted experts run on their banks."""
        if layer not in self.banks:
            raise ValueError(f"layer {layer} is not an MoE layer; MoE layers: {sorted(self.banks)}")
        ids = experts.cpu().numpy()
        mine = (ids >= self.experts.start) & (ids < self.experts.stop)
        parts = [(mine, self.experts, self.banks)]
        if not mine.all():
            parts += [((ids >= r.start) & (ids < r.stop), r, banks) for r, banks in dict(self.adopted).items()]
            rest = np.unique(ids[~np.logical_or.reduce([m for m, _, _ in parts])]).tolist()
            self._load_missing(layer, rest)  # (a restarted group's placed ones)
            placed = dict(self.placed)  # one expert a bank: those the placement puts here
            parts += [(ids == e, range(e, e + 1), {layer: placed[layer, e]}) for e in rest if (layer, e) in placed]
            if not np.logical_or.reduce([m for m, _, _ in parts]).all():
                held = ", ".join(f"{r.start}..{r.stop - 1}" for _, r, _ in parts)
                raise ValueError(f"expert group {self.index} holds experts {held}; got {int(ids.min())}..{int(ids.max())}")
        with self._lock:
            self.tokens[layer] += np.bincount(ids[mine] - self.experts.start, minlength=len(self.experts))
        if len(parts) == 1:
            return self._run(self.banks[layer], x, experts)
        y = torch.empty(x.shape, dtype=torch.float32, device=x.device)  # rows of adopted experts: their banks
        for m, _, banks in parts:
            if m.any():
                pick = torch.from_numpy(np.nonzero(m)[0]).to(x.device)
                y[pick] = self._run(banks[layer], x[pick], experts[pick]).to(y.device)
        return y

    def _run(self, bank, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        if self.backend == "jax":
            return torch.from_numpy(np.asarray(bank(x.float().cpu().numpy(), experts.cpu().numpy())))
        return bank(x.to(self.device, self.dtype), experts.to(self.device)).float()

    def group_stats(self) -> dict:  # (as a colocated worker answers for its group)
        return self.stats()

    def stats(self) -> dict:
        with self._lock:
            out = {"index": self.index, "backend": self.backend, "experts": [self.experts.start, self.experts.stop],
                   "adopted_experts": sorted([r.start, r.stop] for r in self.adopted),
                   "placed_experts": len(self.placed), "loaded_on_demand": self.loaded_on_demand,
                   "placement_version": self.placement.version if self.placement is not None else 0,
                   "adopt_seconds": dict(self.adopt_seconds),
                   "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                   "tokens_per_expert": {layer: t.tolist() for layer, t in self.tokens.items()}}
        if self.backend == "jax":
            from expertmesh.jax_backend.experts import compilations

            out["jax"] = {"compilations": compilations()}
        return out


ROOM = 0.8  # of the free memory an adoption may take


def _arrays(bank) -> list:
    """A bank's weight arrays (torch parameters or JAX arrays)."""
    if isinstance(bank, torch.nn.Module):
        return list(bank.parameters())
    return [a for a in vars(bank).values() if hasattr(a, "nbytes") and hasattr(a, "shape")]


def free_memory_bytes(device: torch.device) -> int:
    """Memory free for more weights: on a GPU what CUDA reports free; else the host's available
    memory (MemAvailable), within the container's limit where one is set."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        avail = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    try:
        limit, used = (open(f"/sys/fs/cgroup/{f}").read().strip() for f in ("memory.max", "memory.current"))
        if limit.isdigit():
            avail = min(avail, int(limit) - int(used))
    except OSError:
        pass
    return avail


RemoteExpertGroup = ray.remote(ExpertGroup)
