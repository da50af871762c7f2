"""Which device and dtype the model's weights and activations live in.

`device`: "auto" (CUDA where this process sees a CUDA device, else the CPU), "cpu", "cuda" or
"cuda:N". `dtype`: "auto" (bfloat16 on CUDA, float32 on the CPU, whose bf16 matmuls are slow),
"float32", "bfloat16" or "float16". Whatever the dtype, attention accumulates in fp32 and its
softmax statistics (LSE) and the merge of partials stay fp32; RoPE angles and routing
(softmax, top-k) are fp32 as in Hugging Face's implementations.

Two places check these strings: the driver (`check_device_dtype`, no CUDA calls: the GPUs may
sit on worker hosts only) and each actor (`local_device_error`, then `resolve_device`).
"""

from __future__ import annotations

import re

import torch

from expertmesh.errors import DeviceError

DEVICES = ("auto", "cpu", "cuda")  # and "cuda:N"
DTYPES = ("auto", "float32", "bfloat16", "float16")
_CUDA_INDEX = re.compile(r"^cuda:(\d+)$")


def _check_device(device: str) -> str:
    if not isinstance(device, str) or not (device in DEVICES or _CUDA_INDEX.match(device)):
        raise ValueError(f"device must be one of {DEVICES} or 'cuda:N', got {device!r}")
    return device


def _check_dtype(dtype: str) -> str:
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return dtype


def check_device_dtype(device: str, dtype: str) -> tuple[str, str]:
    """Validate the two strings (driver side, before any actor starts); touches no CUDA state.

    "cuda" is accepted even where this process sees no GPU: the actors' hosts may have them;
    each actor checks with `local_device_error`.
    """
    return _check_device(device), _check_dtype(dtype)


def local_device_error(device: str) -> str | None:
    """Why this process cannot use `device` (actor side), or None when it can."""
    _check_device(device)
    if not device.startswith("cuda"):
        return None
    if not torch.cuda.is_available():
        return (f"device {device!r}: no CUDA device is visible to this process (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'none, a CPU-only build'}); pass device='cpu' "
                f"(--device cpu), or 'auto' to use a GPU only where one is visible")
    m = _CUDA_INDEX.match(device)
    if m and int(m.group(1)) >= torch.cuda.device_count():
        return (f"device {device!r}: this process sees {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); pass one of those, 'cuda' or 'auto'")
    return None


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" | "cpu" | "cuda" | "cuda:N" -> torch.device; DeviceError if this process cannot use it."""
    if isinstance(device, torch.device):
        device = str(device)
    if _check_device(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    problem = local_device_error(device)
    if problem:
        raise DeviceError(problem)
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """"auto" | "float32" | "bfloat16" | "float16" -> torch.dtype ("auto": bf16 on CUDA, fp32 on CPU)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype}")
        return dtype
    if _check_dtype(dtype) == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, dtype)


def cuda_memory(device: torch.device) -> dict:
    """What PyTorch has allocated on a CUDA device now and at most (empty for any other device)."""
    if device.type != "cuda":
        return {}
    return {"cuda_memory_allocated_bytes": torch.cuda.memory_allocated(device),
            "cuda_max_memory_allocated_bytes": torch.cuda.max_memory_allocated(device)}
