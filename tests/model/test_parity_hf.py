"""The single-process model equals Hugging Face's reference implementation."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from expertmesh import CheckpointError, UnsupportedArchitecture, load_model, save_model
from expertmesh.model.config import ModelConfig
from tests.conftest import ARCHS, VOCAB


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_hugging_face(arch, tiny_checkpoint, hf_model):
    model = load_model(tiny_checkpoint(arch))
    ids = torch.randint(0, VOCAB, (1, 75), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = hf_model(arch)(ids).logits[0]
        out = model(ids)
    assert (out - ref).abs().max().item() <= 1e-4


def test_llama4_layer_kinds_are_read_from_the_config(tiny_checkpoint):
    cfg = load_model(tiny_checkpoint("llama4")).cfg
    assert cfg.use_rope == (True, True, True, False)
    assert cfg.chunk_size == (16, 16, 16, None)
    assert cfg.moe_layers == (False, True, False, True)


def test_save_then_load_round_trips_and_hf_reads_it(tmp_path, tiny_checkpoint, hf_model):
    from transformers import AutoModelForCausalLM

    for arch in ("llama4", "mixtral"):
        model = load_model(tiny_checkpoint(arch))
        save_model(model, tmp_path / arch)
        again = AutoModelForCausalLM.from_pretrained(tmp_path / arch, dtype=torch.float32).eval()
        ids = torch.arange(40)[None]
        with torch.no_grad():
            assert (again(ids).logits[0] - hf_model(arch)(ids).logits[0]).abs().max() <= 1e-5


def test_sharded_checkpoint_loads_and_missing_shard_is_named(tmp_path, hf_model):
    hf_model("mixtral").save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1
    model = load_model(tmp_path)
    ids = torch.arange(30)[None]
    with torch.no_grad():
        assert (model(ids) - hf_model("mixtral")(ids).logits[0]).abs().max() <= 1e-4
    (tmp_path / files[-1]).unlink()
    with pytest.raises(CheckpointError, match=files[-1]):
        load_model(tmp_path)


def test_unsupported_architecture_names_the_supported_list():
    with pytest.raises(UnsupportedArchitecture, match="MixtralForCausalLM.*Llama4ForCausalLM"):
        ModelConfig.from_hf({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})


def test_missing_checkpoint_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path / "nope")


def test_mixtral_sliding_window_matches_hugging_face(tmp_path, tiny_checkpoint):
    """Mixtral with `sliding_window` set: each token sees only the last `window` keys, as in HF."""
    from transformers import AutoModelForCausalLM

    cfg = json.loads((Path(tiny_checkpoint("mixtral")) / "config.json").read_text())
    window_dir = tmp_path / "mixtral-window"
    shutil.copytree(tiny_checkpoint("mixtral"), window_dir)
    (window_dir / "config.json").write_text(json.dumps(dict(cfg, sliding_window=16)))
    ours = load_model(window_dir)
    assert ours.cfg.sliding_window == 16
    hf = AutoModelForCausalLM.from_pretrained(window_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, VOCAB, (1, 75), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref, out = hf(ids).logits[0], ours(ids)
        full = load_model(tiny_checkpoint("mixtral"))(ids)
    assert (out - ref).abs().max().item() <= 1e-4
    assert (full[20:] - ref[20:]).abs().max().item() > 1e-2  # the window changes the logits past it
