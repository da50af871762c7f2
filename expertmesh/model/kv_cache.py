"""A growing per-layer KV cache for one sequence's own tokens (amortised appends)."""

from __future__ import annotations

import torch


class KVCache:
    """k/v [T, Hkv, D] and positions [T] per layer; capacity doubles as tokens arrive."""

    def __init__(self, num_layers: int) -> None:
        self._k: list[torch.Tensor | None] = [None] * num_layers
        self._v: list[torch.Tensor | None] = [None] * num_layers
        self._pos: list[torch.Tensor | None] = [None] * num_layers
        self._len = [0] * num_layers

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        n, t = self._len[layer], k.shape[0]
        buf = self._k[layer]
        if buf is None or n + t > buf.shape[0]:
            cap = max(16, 2 * (n + t))
            for store, new in ((self._k, k), (self._v, v)):
                grown = torch.empty((cap, *new.shape[1:]), dtype=new.dtype, device=new.device)
                if store[layer] is not None:
                    grown[:n] = store[layer][:n]
                store[layer] = grown
            grown_pos = torch.empty(cap, dtype=torch.int64, device=pos.device)
            if self._pos[layer] is not None:
                grown_pos[:n] = self._pos[layer][:n]
            self._pos[layer] = grown_pos
        self._k[layer][n:n + t] = k
        self._v[layer][n:n + t] = v
        self._pos[layer][n:n + t] = pos
        self._len[layer] = n + t

    def truncate(self, tokens: int) -> None:
        """Keep the first `tokens` tokens of every layer (drop a failed step's appends)."""
        self._len = [min(n, tokens) for n in self._len]

    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k [T, Hkv, D], v [T, Hkv, D], positions [T]) of this layer."""
        n = self._len[layer]
        return self._k[layer][:n], self._v[layer][:n], self._pos[layer][:n]

    def __len__(self) -> int:
        return self._len[0]
