"""DeepSeek-V3 / Kimi-K2 (`DeepseekV3ForCausalLM`): the config (latent dims, dense first layers,
group routing, YaRN mscale softmax scale), routing equal to Hugging Face's router, what a token
costs stored vs expanded, and refusals. (Logits against Hugging Face: test_parity_hf.py and the
mesh tests run the `deepseek_v3` tiny checkpoint of tests/conftest.py.)"""

import json
import math

import pytest
import torch

from expertmesh import UnsupportedArchitecture, load_model
from expertmesh.model.config import ModelConfig
from expertmesh.model.moe import route


def _hf_cfg(tiny_checkpoint, **change):
    cfg = json.loads(open(f"{tiny_checkpoint('deepseek_v3')}/config.json").read())
    cfg.update(change)
    return cfg


def test_config_reads_latent_dims_layers_and_scale(tiny_checkpoint):
    cfg = load_model(tiny_checkpoint("deepseek_v3")).cfg
    m = cfg.mla
    assert (m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) == (48, 32, 16, 8, 16)
    assert cfg.num_kv_heads == 1 and cfg.head_dim == 40 and cfg.rope_dim == 8 and cfg.kv_latent
    assert cfg.moe_layers == (False, True, True) and cfg.shared_expert_intermediate_size == 32
    assert (cfg.routing, cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor) == ("sigmoid_group", 4, 2, 2.5)
    mscale = 0.1 * 1.0 * math.log(64.0) + 1.0  # yarn factor 64, mscale_all_dim 1
    assert cfg.attn_scale_factor == pytest.approx((16 + 8) ** -0.5 * mscale ** 2, rel=1e-12)
    assert cfg.kv_bytes_per_token(4) == 3 * 40 * 4  # one latent vector per layer
    assert cfg.expanded_kv_bytes_per_token(4) == 3 * 4 * (16 + 8 + 16) * 4


def test_routing_equals_hugging_faces_router(tiny_checkpoint, hf_model):
    hf = hf_model("deepseek_v3")
    ours = load_model(tiny_checkpoint("deepseek_v3"))
    h = torch.randn(64, 64, generator=torch.Generator().manual_seed(5))
    for i in (1, 2):
        logits, w_ref, idx_ref = hf.model.layers[i].mlp.gate(h)
        idx, w = route(torch.nn.functional.linear(h, ours.layers[i].gate.weight), ours.cfg, ours.layers[i].gate_correction)
        order, order_ref = idx.sort(-1), idx_ref.sort(-1)
        assert torch.equal(order.values, order_ref.values)
        assert torch.allclose(w.gather(1, order.indices), w_ref.gather(1, order_ref.indices), atol=1e-6)
        groups = idx // 2  # 8 experts in 4 groups of 2: every token's experts come from at most topk_group groups
        assert all(len(set(g.tolist())) <= 2 for g in groups)


def test_correction_bias_chooses_but_does_not_weight(tiny_checkpoint):
    ours = load_model(tiny_checkpoint("deepseek_v3"))
    layer, cfg = ours.layers[1], ours.cfg
    logits = torch.zeros(1, 8)
    bias = torch.zeros(8)
    bias[5], bias[4] = 3.0, 2.0  # experts 4 and 5 (group 2) win on the bias alone
    idx, w = route(logits, cfg, bias)
    assert sorted(idx[0].tolist()) == [4, 5]
    assert torch.allclose(w, torch.full((1, 2), 0.5 * cfg.routed_scaling_factor))  # sigmoid(0) each, normed
    assert layer.gate_correction.requires_grad is False


@pytest.mark.parametrize("change,match", [
    ({"topk_method": "greedy", "scoring_func": "softmax"}, "'noaux_tc' with 'sigmoid'"),
    ({"n_group": 3}, "must split into n_group"),
    ({"n_group": 8, "topk_group": 2}, "top 2 experts"),
])
def test_unsupported_variants_are_refused(tiny_checkpoint, change, match):
    with pytest.raises(UnsupportedArchitecture, match=match):
        ModelConfig.from_hf(_hf_cfg(tiny_checkpoint, **change))
