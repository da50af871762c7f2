"""RoPE scaling as Hugging Face defines it (linear, llama3, yarn) on every supported
architecture: the frequencies are transformers' own, bit for bit, and the single-process
model's logits equal Hugging Face's over sequences longer than the original context (where
the scaling matters); other types are refused with the supported ones named."""

import pytest
import torch

from expertmesh import UnsupportedArchitecture, load_model
from expertmesh.model.config import ModelConfig
from expertmesh.model.rope import RopeScaling, rope_frequencies
from tests.conftest import VOCAB

ORIGINAL = 64  # original_max_position_embeddings of the scaled configs; the tests run past it
SEQ = 211

SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL},
    "llama3-scout": {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                     "original_max_position_embeddings": ORIGINAL},  # Llama-4-Scout's: no blend band
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "yarn-mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": ORIGINAL,
                    "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2, "truncate": False},
    "yarn-attention-factor": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": ORIGINAL,
                              "attention_factor": 1.3},
}
CASES = [("mixtral", "linear"), ("mixtral", "yarn-mscale"), ("qwen2moe", "yarn-attention-factor"),
         ("qwen3moe", "yarn"), ("olmoe", "llama3"), ("llama4", "llama3"), ("llama4", "llama3-scout"),
         ("llama4", "yarn")]


def build_scaled(arch: str, scaling: str, path) -> str:
    """A tiny random checkpoint of `arch` whose config carries the RoPE scaling."""
    import transformers as tf

    rope = {"rope_theta": 10000.0, **SCALINGS[scaling]}
    common = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=48, max_position_embeddings=4096, head_dim=16, rope_parameters=rope)
    cfg, cls = {
        "mixtral": lambda: (tf.MixtralConfig(**common, num_hidden_layers=2, num_local_experts=4,
                                             num_experts_per_tok=2), tf.MixtralForCausalLM),
        "qwen2moe": lambda: (tf.Qwen2MoeConfig(**common, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
                                               moe_intermediate_size=32, shared_expert_intermediate_size=40),
                             tf.Qwen2MoeForCausalLM),
        "qwen3moe": lambda: (tf.Qwen3MoeConfig(**common, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
                                               moe_intermediate_size=32), tf.Qwen3MoeForCausalLM),
        "olmoe": lambda: (tf.OlmoeConfig(**common, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2),
                          tf.OlmoeForCausalLM),
        "llama4": lambda: (tf.Llama4TextConfig(**common, num_hidden_layers=4, num_local_experts=4,
                                               num_experts_per_tok=1, intermediate_size_mlp=56,
                                               attention_chunk_size=128, floor_scale=8,
                                               interleave_moe_layer_step=2), tf.Llama4ForCausalLM),
    }[arch]()
    torch.manual_seed(99)
    model = cls(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    cache = {}

    def get(arch, scaling):
        if (arch, scaling) not in cache:
            cache[arch, scaling] = build_scaled(arch, scaling, tmp_path_factory.mktemp(f"{arch}-{scaling}"))
        return cache[arch, scaling]
    return get


@pytest.mark.parametrize("arch,scaling", CASES)
def test_frequencies_are_transformers_own(arch, scaling, scaled):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = AutoConfig.from_pretrained(scaled(arch, scaling))
    ref, ref_scale = ROPE_INIT_FUNCTIONS[hf_cfg.rope_parameters["rope_type"]](hf_cfg, "cpu")
    cfg = ModelConfig.from_file(f"{scaled(arch, scaling)}/config.json")
    freqs, scale = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    assert cfg.rope_scaling.rope_type == SCALINGS[scaling]["rope_type"]
    assert torch.equal(freqs, ref) and scale == ref_scale


@pytest.mark.parametrize("arch,scaling", CASES)
def test_logits_match_hugging_face_past_the_original_context(arch, scaling, scaled):
    from transformers import AutoModelForCausalLM

    path = scaled(arch, scaling)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_model(path)
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, out = hf(ids).logits[0], ours(ids)
        plain = load_model(path)  # the same weights without scaling: the scaling changes the logits
        for layer in plain.layers:
            layer.freqs, layer.rope_scale = rope_frequencies(plain.cfg.head_dim, plain.cfg.rope_theta)
        unscaled = plain(ids)
    assert (out - ref).abs().max().item() <= 1e-4
    assert (unscaled - ref)[ORIGINAL:].abs().max().item() > 1e-3


@pytest.mark.parametrize("params, match", [
    ({"rope_type": "dynamic", "factor": 2.0}, r"rope_type 'dynamic' is not supported; supported: 'default', "
                                               r"'linear', 'llama3', 'yarn'"),
    ({"rope_type": "longrope", "short_factor": [1.0]}, "not supported"),
    ({"rope_type": "llama3", "factor": 8.0}, "needs low_freq_factor, high_freq_factor, original_max_position"),
    ({"rope_type": "linear"}, "needs factor"),
    ({"rope_type": "linear", "factor": -1.0}, "factor must be > 0"),
    ({"rope_type": "default", "partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 is not supported"),
])
def test_other_or_incomplete_scalings_are_refused_by_name(params, match):
    cfg = {"architectures": ["MixtralForCausalLM"], "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_local_experts": 2, "num_experts_per_tok": 1, "intermediate_size": 8,
           "max_position_embeddings": 128, "rope_parameters": {"rope_theta": 10000.0, **params}}
    with pytest.raises(UnsupportedArchitecture, match=match):
        ModelConfig.from_hf(cfg)


def test_the_older_rope_scaling_key_reads_the_same():
    base = {"architectures": ["MixtralForCausalLM"], "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_local_experts": 2, "num_experts_per_tok": 1, "intermediate_size": 8,
            "max_position_embeddings": 128, "rope_theta": 500000.0}
    old = ModelConfig.from_hf({**base, "rope_scaling": {"type": "linear", "factor": 2.0}})
    new = ModelConfig.from_hf({**base, "rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                           "rope_theta": 500000.0}})
    assert old.rope_scaling == new.rope_scaling == RopeScaling("linear", 2.0) and old.rope_theta == 500000.0
