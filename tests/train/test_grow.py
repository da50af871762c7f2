"""Growing a training state by a global layer (scripts/grow_demo_model.py) and training only that layer
(`train_only`): the grown model computes what the state did, and frozen parameters do not move."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from expertmesh.model.checkpoint import load_model
from expertmesh.pipelines.train_config import TrainConfig
from expertmesh.pipelines.train_step import BatchedModel, build_model, collate, load_state, make_optimizer, save_state
from expertmesh.pipelines.train_step import step as train_step

ROOT = Path(__file__).resolve().parents[2]
TWO_LAYERS = {"num_hidden_layers": 2, "no_rope_layers": [1, 0], "attention_chunk_size": 256,
              "layer_types": ["chunked_attention", "full_attention"], "moe_layers": [0, 1]}


def _grow_module():
    spec = importlib.util.spec_from_file_location("grow_demo_model", ROOT / "scripts" / "grow_demo_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _batches(tmp_path, n=2):
    import pyarrow.parquet as pq

    from expertmesh.pipelines.train_data import DataSpec, write_dataset

    write_dataset(tmp_path / "data", DataSpec(rows=2 * n, lengths=(640,), group_rows=2, seed=5), files=1)
    rows = pq.read_table(tmp_path / "data").to_pydict()
    return [collate({k: v[i:i + 2] for k, v in rows.items()}) for i in range(0, 2 * n, 2)]


def _trained_state(tmp_path) -> tuple[Path, TrainConfig]:
    cfg = TrainConfig.from_dict({"data": "unused", "warmup_steps": 1, "max_steps": 8, "model": TWO_LAYERS})
    model = build_model(cfg)
    opt = make_optimizer(model, cfg)
    for i, b in enumerate(_batches(tmp_path)):
        train_step(BatchedModel(model), model, opt, b, cfg, i, torch.device("cpu"))
    return save_state(model, opt, 2, tmp_path / "state"), cfg


def test_grown_state_gives_the_same_logits_and_moves_its_optimizer_state(tmp_path):
    state, _ = _trained_state(tmp_path)
    before = load_model(state).eval()
    with safe_open(str(state / "optimizer.safetensors"), "pt") as f:
        old_last = f.get_tensor("layers.1.q_proj.weight::exp_avg")
    out = _grow_module().grow(state, 1)
    assert out["layer_types"] == ["chunked_attention", "full_attention", "full_attention"]
    cfg = json.loads((state / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and cfg["no_rope_layers"] == [1, 0, 0] and cfg["moe_layers"] == [0, 1, 2]
    after = load_model(state).eval()
    ids = torch.randint(4, 260, (600,), generator=torch.Generator().manual_seed(1))  # crosses two 256-token chunks
    with torch.no_grad():
        assert torch.equal(before(ids), after(ids))
    with safe_open(str(state / "optimizer.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert torch.equal(f.get_tensor("layers.2.q_proj.weight::exp_avg"), old_last)  # moved with its layer
    assert not any(k.startswith("layers.1.") for k in keys)  # the new layer starts without moments
    trainer = json.loads((state / "trainer_state.json").read_text())
    assert "layers.2.q_proj.weight::step" in trainer["optimizer_scalars"]
    assert trainer["grown"] == [{"at": 1, "copied_from": 1, "step": 2}]
    with pytest.raises(SystemExit, match="--at must be in 1..3"):
        _grow_module().grow(state, 0)


def test_train_only_moves_only_the_named_layer_and_keeps_the_others_moments(tmp_path):
    state, _ = _trained_state(tmp_path)
    _grow_module().grow(state, 1)
    cfg = TrainConfig.from_dict({"data": "unused", "warmup_steps": 1, "max_steps": 8, "resume_from": str(state),
                                 "train_only": ["layers.1."]})
    model = build_model(cfg)
    opt = make_optimizer(model, cfg)
    assert load_state(model, opt, state, torch.device("cpu")) == 2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(BatchedModel(model), model, opt, _batches(tmp_path / "more", 1)[0], cfg, 2, torch.device("cpu"))
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.startswith("layers.1.") for n in moved), moved
    assert "layers.1.o_proj.weight" in moved  # zero-initialised output: the first to get a gradient
    save_state(model, opt, 3, tmp_path / "again")
    with safe_open(str(tmp_path / "again" / "optimizer.safetensors"), "pt") as f:
        assert "layers.2.q_proj.weight::exp_avg" in set(f.keys())  # frozen layers keep their moments
    with pytest.raises(ValueError, match="no parameter name starts with 'model.layers.1'"):
        build_model(TrainConfig.from_dict({"data": "unused", "resume_from": str(state),
                                           "train_only": ["model.layers.1"]}))
    with pytest.raises(ValueError, match="train_only must be a non-empty list"):
        TrainConfig.from_dict({"data": "unused", "train_only": "layers.1."})


def test_the_command_line_sets_lr_and_train_only():
    import argparse

    from expertmesh.pipelines.train import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args(["--config", str(ROOT / "configs" / "demo-model-cpu.yaml"), "--lr", "2e-3",
                                         "--train-only", "layers.2.", "--train-only", "norm."]))
    assert cfg.lr == 2e-3 and cfg.train_only == ["layers.2.", "norm."]
    assert config_from_args(p.parse_args(["--config", str(ROOT / "configs" / "demo-model-cpu.yaml")])).train_only is None
