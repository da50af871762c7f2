"""The embedded default model: a small Llama-4-style (iRoPE) MoE with a byte vocabulary.

A trained checkpoint shipped under `expertmesh/assets/default-model/` is used when present;
otherwise a deterministic random initialisation of the same architecture is written once to
the cache, so every actor on every host builds identical weights without a download.
"""

from __future__ import annotations

import os
from pathlib import Path

from expertmesh.model.block import init_weights
from expertmesh.model.config import ModelConfig
from expertmesh.model.transformer import MoETransformer

SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "default-model"

DEFAULT_HF_CONFIG = {
    "architectures": ["Llama4ForCausalLM"],
    "model_type": "llama4_text",
    "vocab_size": 260,  # 4 special ids (pad, bos, eos, unk) + 256 bytes
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 256,
    "intermediate_size_mlp": 256,
    "num_local_experts": 8,
    "num_experts_per_tok": 1,
    "interleave_moe_layer_step": 1,
    "moe_layers": [0, 1, 2, 3],
    "no_rope_layers": [1, 1, 1, 0],  # layers 0-2 chunked-local RoPE, layer 3 global NoPE
    "layer_types": ["chunked_attention", "chunked_attention", "chunked_attention", "full_attention"],
    "attention_chunk_size": 2048,
    "attn_temperature_tuning": True,
    "floor_scale": 2048,
    "attn_scale": 0.1,
    "use_qk_norm": True,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "max_position_embeddings": 1 << 24,  # NoPE global layer; RoPE only within 2048-token chunks
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "router_aux_loss_coef": 0.001,
    "torch_dtype": "float32",
}


def default_checkpoint() -> Path:
    """Directory of the default model (the shipped one, else a cached random init)."""
    if (SHIPPED / "config.json").is_file():
        return SHIPPED
    from expertmesh.model.checkpoint import save_model

    cache = Path(os.environ.get("EXPERTMESH_CACHE", Path.home() / ".cache" / "expertmesh"))
    root = cache / "default-random-v3"
    if not (root / "model.safetensors").is_file():
        model = MoETransformer(ModelConfig.from_hf(DEFAULT_HF_CONFIG))
        init_weights(model, seed=0)
        tmp = root.with_name(f"{root.name}.{os.getpid()}.partial")
        save_model(model, tmp)
        try:
            tmp.rename(root)
        except OSError:  # another process won the race; its copy is identical
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return root
