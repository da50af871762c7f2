"""Rotary position embeddings in the two layouts the supported checkpoints use, with the
scaling types Hugging Face defines for long contexts.

`half` (Llama, Mixtral, Qwen, OLMoE): rotate the two halves of the head dimension.
`interleaved` (Llama-4): rotate adjacent pairs, as complex multiplication.

Scaling (`rope_parameters` / `rope_scaling` of config.json; transformers'
`modeling_rope_utils.py`, whose float32 arithmetic is followed step by step so the
frequencies are bit-equal):
  default  theta ** (-2i / D)
  linear   default / factor
  llama3   long wavelengths / factor, short ones kept, a smooth blend between
           (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
  yarn     a per-dimension blend of interpolated and extrapolated frequencies (beta_fast,
           beta_slow, `truncate`), and cos/sin scaled by the attention factor (given, or
           0.1 ln(factor) + 1, or the ratio of the mscale / mscale_all_dim terms)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

# Below this position the angles are Hugging Face's float32 products (bit-equal logits);
# from it on they are computed in float64 (exact rotations for multi-million-token contexts).
EXACT_ANGLES_FROM = 1 << 21
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A checkpoint's RoPE scaling (rope_type "default": none)."""

    rope_type: str = "default"
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    beta_fast: float | None = None  # yarn
    beta_slow: float | None = None  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    attention_factor: float | None = None  # yarn
    truncate: bool = True  # yarn

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "RopeScaling":
        """From config.json (`rope_parameters`, or the older `rope_scaling`); raises ValueError
        naming what is missing or unsupported."""
        params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_type = params.get("rope_type", params.get("type", "default"))
        partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        if partial != 1.0:
            raise ValueError(f"partial_rotary_factor {partial} is not supported (RoPE over the whole head only)")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {', '.join(map(repr, ROPE_TYPES))}")
        if rope_type == "default":
            return cls()
        original = params.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
        need = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
                "yarn": ()}[rope_type]
        missing = [k for k in need if params.get(k) is None]
        if rope_type in ("llama3", "yarn") and original is None:
            missing.append("original_max_position_embeddings")
        if missing:
            raise ValueError(f"rope_type {rope_type!r} needs {', '.join(missing)} in rope_parameters")
        factor = params.get("factor")
        if rope_type == "yarn" and factor is None:  # DeepSeek-style: the ratio of the two lengths
            factor = cfg["max_position_embeddings"] / original
        if factor is not None and not factor > 0:
            raise ValueError(f"rope_parameters.factor must be > 0, got {factor}")
        if rope_type == "llama3" and params["high_freq_factor"] < params["low_freq_factor"]:
            raise ValueError(f"rope_parameters: high_freq_factor ({params['high_freq_factor']}) must be at least "
                             f"low_freq_factor ({params['low_freq_factor']})")  # equal: Llama-4-Scout, no blend
        return cls(rope_type, None if factor is None else float(factor), None if original is None else int(original),
                   params.get("low_freq_factor"), params.get("high_freq_factor"), params.get("beta_fast"),
                   params.get("beta_slow"), params.get("mscale"), params.get("mscale_all_dim"),
                   params.get("attention_factor"), bool(params.get("truncate", True)))


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling = RopeScaling()) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [D/2] fp32, the factor cos and sin are multiplied by)."""
    base = inv_freq(head_dim, theta)
    kind = scaling.rope_type
    if kind == "default":
        return base, 1.0
    if kind == "linear":
        return base / scaling.factor, 1.0
    if kind == "llama3":
        return _llama3(base, scaling), 1.0
    return _yarn(head_dim, theta, scaling)


def inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # [D/2]


def _llama3(inv: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    old = s.original_max_position_embeddings
    low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(dim: int, base: float, s: RopeScaling) -> tuple[torch.Tensor, float]:
    factor = s.factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    attention = s.attention_factor
    if attention is None:
        attention = (float(mscale(factor, s.mscale) / mscale(factor, s.mscale_all_dim))
                     if s.mscale and s.mscale_all_dim else mscale(factor))
    beta_fast, beta_slow = s.beta_fast or 32, s.beta_slow or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi))) / (2 * math.log(base))
    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1: extrapolate (the dimension's frequency unchanged)
    return interpolation * (1 - keep) + extrapolation * keep, attention


def apply_rope(x: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor, style: str,
               scale: float = 1.0) -> torch.Tensor:
    """x [T, H, D], pos [T] -> x rotated by its position (cos and sin times `scale`, YaRN's
    attention factor), same shape and dtype."""
    return rotate(x, *rope_tables(pos, freqs, scale, x.device), style)


def rope_tables(pos: torch.Tensor, freqs: torch.Tensor, scale: float = 1.0,
                device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, 1, D/2] of positions [T] (times `scale`): computed once for q and k."""
    device = pos.device if device is None else device
    angles = pos[:, None].float() * freqs[None, :].to(device)  # [T, D/2], as Hugging Face computes them
    cos, sin = angles.cos(), angles.sin()
    far = pos >= EXACT_ANGLES_FROM
    if bool(far.any()):
        # a float32 product pos * freq is off by up to ~pos * 6e-8 radians (0.6 rad at position
        # 10M), which garbles rotations in multi-million-token contexts: float64 there
        a64 = pos[far, None].to(torch.float64) * freqs[None, :].to(device, torch.float64)
        cos[far], sin[far] = a64.cos().float(), a64.sin().float()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos[:, None, :], sin[:, None, :]  # [T, 1, D/2]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """x [T, H, D] rotated by rope_tables' cos and sin, same shape and dtype."""
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
