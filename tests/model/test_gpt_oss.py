"""GPT-OSS (`GptOssForCausalLM`): attention sinks counted once after an LSE merge of any number
of parts, alternating sliding-window / full layers read from `layer_types`, router and expert
biases, the clamped SwiGLU, YaRN; MXFP4 checkpoints refused with the conversion named.
(Logits against Hugging Face: test_parity_hf.py and the mesh tests run the `gpt_oss` tiny
checkpoint of tests/conftest.py with the other architectures.)"""

import json

import pytest
import torch

from expertmesh import UnsupportedArchitecture, load_model
from expertmesh.model.attention import merge_partials, partial_attention
from expertmesh.model.config import ModelConfig
from expertmesh.model.rope import RopeScaling
from tests.conftest import VOCAB


def _reference_with_sinks(q, k, v, sinks, scale):
    """softmax([q.k, sink]) without the sink column, times v: HF's eager GPT-OSS attention."""
    hq, g = q.shape[1], q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("thd,shd->hts", q, kk) * scale
    s = s.masked_fill(~torch.ones(len(q), len(k), dtype=torch.bool).tril(len(k) - len(q)), float("-inf"))
    logits = torch.cat([s, sinks.view(hq, 1, 1).expand(hq, len(q), 1)], -1)
    p = torch.softmax(logits, -1)[..., :-1]
    return torch.einsum("hts,shd->thd", p, vv)


@pytest.mark.parametrize("cuts", [[], [5], [3, 11, 17]])
def test_sinks_count_once_however_the_keys_are_split(tiny_checkpoint, cuts):
    layer = load_model(tiny_checkpoint("gpt_oss")).layers[1]  # a full-attention layer
    gen = torch.Generator().manual_seed(0)
    t, hq, hkv, d = 23, 4, 2, 16
    q, k, v = torch.randn(t, hq, d, generator=gen), torch.randn(t, hkv, d, generator=gen), torch.randn(t, hkv, d, generator=gen)
    pos = torch.arange(t)
    bounds = [0, *cuts, t]
    parts = [partial_attention(q, pos, k[a:b], v[a:b], pos[a:b], layer.spec) for a, b in zip(bounds, bounds[1:])]
    out, lse = merge_partials(parts)
    got = layer.sink(out, lse)
    want = _reference_with_sinks(q, k, v, layer.sinks.detach(), layer.spec.scale)
    assert (got - want).abs().max() <= 1e-5
    assert (out - want).abs().max() > 1e-3  # the sinks matter in this checkpoint


def test_config_reads_layer_kinds_routing_and_biases(tiny_checkpoint):
    model = load_model(tiny_checkpoint("gpt_oss"))
    cfg = model.cfg
    assert cfg.window_layers == (True, False) and cfg.sliding_window == 24
    assert [model.layers[i].spec.window for i in range(2)] == [24, None]
    assert cfg.routing == "topk_softmax" and cfg.router_bias and cfg.expert_bias and cfg.o_bias
    assert cfg.swiglu_clamp == (1.702, 1.5) and cfg.attention_sinks
    assert cfg.rope_scaling.rope_type == "yarn" and cfg.rope_theta == 150000.0
    bank = model.layers[0].experts
    assert bank.gate_bias.shape == (4, 48) and bank.down_bias.shape == (4, 64)


def test_rope_scaling_matters_past_the_original_context(tiny_checkpoint):
    model = load_model(tiny_checkpoint("gpt_oss"))
    ids = torch.randint(0, VOCAB, (150,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        scaled = model(ids)
        for layer in model.layers:  # plain RoPE at the same theta
            from expertmesh.model.rope import rope_frequencies
            layer.freqs, layer.rope_scale = rope_frequencies(model.cfg.head_dim, model.cfg.rope_theta, RopeScaling())
        plain = model(ids)
    assert (scaled[80:] - plain[80:]).abs().max() > 1e-2


def _cfg(tiny_checkpoint, **change):
    cfg = json.loads(open(f"{tiny_checkpoint('gpt_oss')}/config.json").read())
    cfg.update(change)
    return cfg


def test_mxfp4_checkpoints_are_refused_with_the_conversion(tiny_checkpoint):
    cfg = _cfg(tiny_checkpoint, quantization_config={"quant_method": "mxfp4", "modules_to_not_convert": []})
    with pytest.raises(UnsupportedArchitecture, match=r"'mxfp4'.*Mxfp4Config\(dequantize=True\)"):
        ModelConfig.from_hf(cfg)


def test_unknown_layer_types_are_refused(tiny_checkpoint):
    with pytest.raises(UnsupportedArchitecture, match="'linear_attention'.*supported: 'sliding_attention'"):
        ModelConfig.from_hf(_cfg(tiny_checkpoint, layer_types=["sliding_attention", "linear_attention"]))
