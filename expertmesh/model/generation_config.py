"""A checkpoint's `generation_config.json`: the eos ids generation stops at, and the sampling
defaults a request that names none gets (as vLLM's `--generation-config auto`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")  # what vLLM takes from it


def read(checkpoint_dir: str | Path) -> dict[str, Any]:
    """generation_config.json as a dict ({} when the checkpoint has none)."""
    path = Path(checkpoint_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def eos_ids(generation_config: dict[str, Any]) -> list[int]:
    eos = generation_config.get("eos_token_id")
    return [int(i) for i in (eos if isinstance(eos, list) else [] if eos is None else [eos])]


def sampling_defaults(checkpoint_dir: str | Path) -> dict[str, float]:
    """The sampling values the checkpoint's authors chose (temperature, top_p, top_k, min_p,
    repetition_penalty), for fields a request leaves out."""
    cfg = read(checkpoint_dir)
    return {k: cfg[k] for k in SAMPLING_DEFAULTS if isinstance(cfg.get(k), (int, float)) and not isinstance(cfg[k], bool)}
