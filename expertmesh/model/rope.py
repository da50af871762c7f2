"""Rotary position embeddings in the two layouts the supported checkpoints use.

`half` (Llama, Mixtral, Qwen, OLMoE): rotate the two halves of the head dimension.
`interleaved` (Llama-4): rotate adjacent pairs, as complex multiplication.
"""

from __future__ import annotations

import torch

# Below this position the angles are Hugging Face's float32 products (bit-equal logits);
# from it on they are computed in float64 (exact rotations for multi-million-token contexts).
EXACT_ANGLES_FROM = 1 << 21


def inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # [D/2]


def apply_rope(x: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor, style: str) -> torch.Tensor:
    """x [T, H, D], pos [T] -> x rotated by its position, same shape and dtype."""
    angles = pos[:, None].float() * freqs[None, :].to(x.device)  # [T, D/2], as Hugging Face computes them
    cos, sin = angles.cos(), angles.sin()
    far = pos >= EXACT_ANGLES_FROM
    if bool(far.any()):
        # a float32 product pos * freq is off by up to ~pos * 6e-8 radians (0.6 rad at position
        # 10M), which garbles rotations in multi-million-token contexts: float64 there
        a64 = pos[far, None].to(torch.float64) * freqs[None, :].to(x.device, torch.float64)
        cos[far], sin[far] = a64.cos().float(), a64.sin().float()
    cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, D/2]
    xf = x.float()
    if style == "interleaved":
        pairs = xf.reshape(*x.shape[:-1], -1, 2)  # [T, H, D/2, 2]
        re, im = pairs[..., 0], pairs[..., 1]
        out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(-2)
    else:
        half = x.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]
        cos2, sin2 = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
        out = xf * cos2 + torch.cat((-x2, x1), -1) * sin2
    return out.to(x.dtype)
