"""Shared fixtures: tiny random Hugging Face checkpoints, one local Ray cluster per session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("PYTHONWARNINGS", "ignore")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

ARCHS = ("mixtral", "qwen2moe", "qwen3moe", "olmoe", "llama4", "gpt_oss", "deepseek_v3")
VOCAB = 300


def build_tiny(arch: str, path) -> str:
    """A tiny random checkpoint of `arch`, saved with transformers' own save_pretrained."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=48, max_position_embeddings=4096)
    if arch == "mixtral":
        cfg, cls = tf.MixtralConfig(**common, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                                    eos_token_id=2, bos_token_id=1), tf.MixtralForCausalLM
    elif arch == "qwen2moe":
        cfg, cls = tf.Qwen2MoeConfig(**common, num_hidden_layers=3, num_experts=4, num_experts_per_tok=2,
                                     moe_intermediate_size=32, shared_expert_intermediate_size=40,
                                     decoder_sparse_step=1, mlp_only_layers=[1]), tf.Qwen2MoeForCausalLM
    elif arch == "qwen3moe":
        cfg, cls = tf.Qwen3MoeConfig(**common, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
                                     moe_intermediate_size=32, head_dim=16, norm_topk_prob=True), tf.Qwen3MoeForCausalLM
    elif arch == "olmoe":
        cfg, cls = tf.OlmoeConfig(**common, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
                                  clip_qkv=0.5, eos_token_id=VOCAB - 1, pad_token_id=0), tf.OlmoeForCausalLM
    elif arch == "llama4":
        cfg, cls = tf.Llama4TextConfig(**common, num_hidden_layers=4, num_local_experts=4, num_experts_per_tok=1,
                                       intermediate_size_mlp=56, attention_chunk_size=16, head_dim=16,
                                       floor_scale=8, interleave_moe_layer_step=2,
                                       eos_token_id=2, bos_token_id=1), tf.Llama4ForCausalLM
    elif arch == "gpt_oss":  # alternating sliding (window 24) / full layers, yarn as the public configs
        cfg, cls = tf.GptOssConfig(**common, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                                   head_dim=16, sliding_window=24, swiglu_limit=1.5,
                                   rope_parameters={"rope_type": "yarn", "factor": 64.0, "beta_fast": 32.0,
                                                    "beta_slow": 1.0, "truncate": False, "rope_theta": 150000.0,
                                                    "original_max_position_embeddings": 64},
                                   eos_token_id=2, bos_token_id=1), tf.GptOssForCausalLM
    elif arch == "deepseek_v3":  # MLA with q and kv LoRA, group-limited sigmoid routing, a dense first layer
        cfg, cls = tf.DeepseekV3Config(
            **{**common, "num_key_value_heads": 4}, num_hidden_layers=3, moe_intermediate_size=32,
            n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
            routed_scaling_factor=2.5, first_k_dense_replace=1, q_lora_rank=48, kv_lora_rank=32,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            rope_parameters={"rope_type": "yarn", "factor": 64.0, "original_max_position_embeddings": 64,
                             "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1,
                             "rope_theta": 10000.0},
            eos_token_id=2, bos_token_id=1), tf.DeepseekV3ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(1234)
    model = cls(cfg)
    with torch.no_grad():  # random tiny models have flat logits; sharpen them so greedy choices are clear
        model.lm_head.weight.mul_(30.0)
        if arch == "deepseek_v3":  # the correction bias starts at zero: make it choose
            for layer in model.model.layers[1:]:
                layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.05)
                layer.mlp.gate.weight.copy_(torch.randn(layer.mlp.gate.weight.shape))
        for name, p in model.named_parameters() if arch == "gpt_oss" else ():  # biases, sinks start at 0
            if name.endswith(("bias", "sinks")):
                p.copy_(torch.randn(p.shape) * (1.0 if name.endswith("sinks") else 0.1))
            if name.endswith("router.weight"):  # routing that depends on the token: every expert chosen
                p.copy_(torch.randn(p.shape))
            if name.endswith("experts.gate_up_proj"):  # large enough that the SwiGLU clamp engages
                p.mul_(20.0)
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    cache: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in cache:
            cache[arch] = build_tiny(arch, tmp_path_factory.mktemp(arch))
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def hf_model(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = AutoModelForCausalLM.from_pretrained(tiny_checkpoint(arch), dtype=torch.float32).eval()
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray cluster for the whole session (ray.init costs ~6 s here)."""
    import ray

    os.environ.setdefault("EXPERTMESH_CACHE", str(tmp_path_factory.mktemp("cache")))
    zygote = None
    if os.environ.get("EXPERTMESH_TEST_FORK", "1") == "1":  # workers forked with torch loaded (tests/zygote.py); 0: as Ray starts them
        from tests import zygote as fork_server

        sock = tmp_path_factory.mktemp("zygote") / "zygote.sock"
        zygote = fork_server.start(sock)
        fork_server.install(sock)
    # metrics exported every 2 s, not Ray's 10 s: the tests that read them (Prometheus, Ray's endpoint) wait less
    ray.init(address="local", resources={"context_shard": 64, "expert_group": 64}, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"EXPERTMESH_CACHE": os.environ["EXPERTMESH_CACHE"]}},
             _system_config={"metrics_report_interval_ms": 2000})
    yield ray
    ray.shutdown()
    if zygote is not None:
        zygote.terminate()
        zygote.wait(timeout=30)
