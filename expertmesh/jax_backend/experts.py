"""Grouped SwiGLU experts (plain, or biased and clamped as GPT-OSS) in JAX: the JAX twin of `expertmesh.model.moe.ExpertBank`.

Rows are sorted by expert inside the jitted program and run as one grouped matmul per
projection (`jax.lax.ragged_dot`: a grouped GEMM, megablox on TPU). The router applies each
architecture's routing weights as it does for the PyTorch groups (Llama-4 scales the rows
before they come here, the others weight the outputs), so a group computes only the FFN.

Rows are padded to bucket sizes (`expertmesh.jax_backend.bucket`); a padded row carries the
expert id `count` (past the held ones), sorts last, belongs to no group and comes out zero.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from expertmesh.jax_backend import bucket


@functools.partial(jax.jit, static_argnames=("clamp",))
def expert_ffn(x_NH, local_N, gate_EHI, up_EHI, down_EIH, bias=None, clamp=None) -> jax.Array:
    """x [N, H] rows, local_N int32 [N] expert ids within the bank (padding: E) -> y [N, H].

    bias: (gate [E+1, I], up [E+1, I], down [E+1, H]) with a zero last row for padding, or None;
    clamp: (alpha, limit) for GPT-OSS's clamped SwiGLU, or None for SwiGLU."""
    e = gate_EHI.shape[0]
    order_N = jnp.argsort(local_N, stable=True)
    xs_NH = x_NH[order_N]  # sorted by expert
    sizes_E = jnp.bincount(local_N, length=e + 1)[:e].astype(jnp.int32)  # padding rows in no group
    g_NI, u_NI = jax.lax.ragged_dot(xs_NH, gate_EHI, sizes_E), jax.lax.ragged_dot(xs_NH, up_EHI, sizes_E)
    sorted_N = local_N[order_N]
    if bias is not None:
        g_NI, u_NI = g_NI + bias[0][sorted_N], u_NI + bias[1][sorted_N]
    if clamp is None:
        h_NI = jax.nn.silu(g_NI) * u_NI
    else:
        alpha, limit = clamp
        g_NI = jnp.minimum(g_NI, limit)
        h_NI = (jnp.clip(u_NI, -limit, limit) + 1) * (g_NI * jax.nn.sigmoid(g_NI * alpha))
    ys_NH = jax.lax.ragged_dot(h_NI, down_EIH, sizes_E)
    if bias is not None:
        ys_NH = ys_NH + bias[2][sorted_N]
    return jnp.zeros_like(ys_NH).at[order_N].set(ys_NH)


class JaxExpertBank:
    """Experts `first .. first+count-1` of one MoE layer as JAX arrays on `device`:
    gate/up [E, H, I], down [E, I, H] (matmul orientation)."""

    def __init__(self, gate_EIH: np.ndarray, up_EIH: np.ndarray, down_EHI: np.ndarray, first: int,
                 device=None, bias: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                 clamp: tuple[float, float] | None = None) -> None:
        self.first, self.count = first, gate_EIH.shape[0]
        put = lambda a: jax.device_put(np.ascontiguousarray(np.swapaxes(a, 1, 2), dtype=np.float32), device)  # noqa: E731
        self.gate, self.up, self.down = put(gate_EIH), put(up_EIH), put(down_EHI)
        padded = lambda b: jax.device_put(np.concatenate([b, np.zeros_like(b[:1])]).astype(np.float32), device)  # noqa: E731
        self.bias = None if bias is None else tuple(padded(b) for b in bias)
        self.clamp = clamp

    def __call__(self, x: np.ndarray, experts: np.ndarray) -> np.ndarray:
        """x [N, H] rows, experts [N] global expert ids held here -> y [N, H] (numpy)."""
        n, h = x.shape
        size = bucket(n)
        xp = np.zeros((size, h), np.float32)
        xp[:n] = x
        local = np.full(size, self.count, np.int32)
        local[:n] = experts - self.first
        return np.asarray(expert_ffn(xp, local, self.gate, self.up, self.down, self.bias, self.clamp))[:n]


def load_banks(checkpoint: str | os.PathLike, held: range, device=None) -> dict[int, JaxExpertBank]:
    """Experts `held` of every MoE layer from the checkpoint's safetensors files: {layer: bank}.

    The tensors are read by the same loader as the PyTorch groups (`load_experts`: names and
    packed layouts of every architecture) and handed over as NumPy: no conversion step."""
    from expertmesh.model.checkpoint import load_experts

    def bias(b):
        return tuple(getattr(b, n).detach().numpy() for n in ("gate_bias", "up_bias", "down_bias")) if b.has_bias else None

    return {layer: JaxExpertBank(b.gate.detach().numpy(), b.up.detach().numpy(), b.down.detach().numpy(),
                                 b.first, device, bias=bias(b), clamp=b.clamp)
            for layer, b in load_experts(checkpoint, held).items()}


def compilations() -> int:
    return expert_ffn._cache_size()
