"""The shipped training configs parse, and the demo model's config matches the shipped model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from expertmesh.model.default import DEFAULT_HF_CONFIG, SHIPPED
from expertmesh.pipelines.train_config import TrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    cfg = TrainConfig.from_yaml(path)
    assert cfg.max_steps >= 1 and cfg.data


def test_shipped_model_has_the_default_architecture():
    shipped = json.loads((SHIPPED / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "num_local_experts", "attention_chunk_size", "floor_scale",
                "no_rope_layers", "vocab_size"):
        assert shipped[key] == DEFAULT_HF_CONFIG[key], key
    assert (SHIPPED / "model.safetensors").stat().st_size <= 20 * 2 ** 20  # <= 20 MB in the repository
