"""Grouped SwiGLU experts in JAX: the JAX twin of `expertmesh.model.moe.ExpertBank`.

Rows are sorted by expert inside the jitted program and run as one grouped matmul per
projection (`jax.lax.ragged_dot`: a grouped GEMM, megablox on TPU). The router applies each
architecture's routing weights as it does for the PyTorch groups (Llama-4 scales the rows
before they come here, the others weight the outputs), so a group computes only the FFN.

Rows are padded to bucket sizes (`expertmesh.jax_backend.bucket`); a padded row carries the
expert id `count` (past the held ones), sorts last, belongs to no group and comes out zero.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from expertmesh.jax_backend import bucket


@jax.jit
def expert_ffn(x_NH, local_N, gate_EHI, up_EHI, down_EIH) -> jax.Array:
    """x [N, H] rows, local_N int32 [N] expert ids within the bank (padding: E) -> y [N, H]."""
    e = gate_EHI.shape[0]
    order_N = jnp.argsort(local_N, stable=True)
    xs_NH = x_NH[order_N]  # sorted by expert
    sizes_E = jnp.bincount(local_N, length=e + 1)[:e].astype(jnp.int32)  # padding rows in no group
    h_NI = jax.nn.silu(jax.lax.ragged_dot(xs_NH, gate_EHI, sizes_E)) * jax.lax.ragged_dot(xs_NH, up_EHI, sizes_E)
    ys_NH = jax.lax.ragged_dot(h_NI, down_EIH, sizes_E)
    return jnp.zeros_like(ys_NH).at[order_N].set(ys_NH)


class JaxExpertBank:
    """Experts `first .. first+count-1` of one MoE layer as JAX arrays on `device`:
    gate/up [E, H, I], down [E, I, H] (matmul orientation)."""

    def __init__(self, gate_EIH: np.ndarray, up_EIH: np.ndarray, down_EHI: np.ndarray, first: int,
                 device=None) -> None:
        self.first, self.count = first, gate_EIH.shape[0]
        put = lambda a: jax.device_put(np.ascontiguousarray(np.swapaxes(a, 1, 2), dtype=np.float32), device)  # noqa: E731
        self.gate, self.up, self.down = put(gate_EIH), put(up_EIH), put(down_EHI)

    def __call__(self, x: np.ndarray, experts: np.ndarray) -> np.ndarray:
        """x [N, H] rows, experts [N] global expert ids held here -> y [N, H] (numpy)."""
        n, h = x.shape
        size = bucket(n)
        xp = np.zeros((size, h), np.float32)
        xp[:n] = x
        local = np.full(size, self.count, np.int32)
        local[:n] = experts - self.first
        return np.asarray(expert_ffn(xp, local, self.gate, self.up, self.down))[:n]


def load_banks(checkpoint: str | os.PathLike, held: range, device=None) -> dict[int, JaxExpertBank]:
    """Experts `held` of every MoE layer from the checkpoint's safetensors files: {layer: bank}.

    The tensors are read by the same loader as the PyTorch groups (`load_experts`: names and
    packed layouts of every architecture) and handed over as NumPy: no conversion step."""
    from expertmesh.model.checkpoint import load_experts

    return {layer: JaxExpertBank(b.gate.detach().numpy(), b.up.detach().numpy(), b.down.detach().numpy(),
                                 b.first, device)
            for layer, b in load_experts(checkpoint, held).items()}


def compilations() -> int:
    return expert_ffn._cache_size()
