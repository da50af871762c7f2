"""Typed model configuration, read from a Hugging Face `config.json`.

One dataclass describes every supported architecture; the per-architecture differences
(routing rule, q/k norms, shared expert, RoPE layout, chunked layers) are explicit fields,
so model code branches on properties, never on architecture names.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Literal

from expertmesh.errors import UnsupportedArchitecture
from expertmesh.model.attention import AttentionSpec
from expertmesh.model.mla import LatentDims
from expertmesh.model.rope import RopeScaling

SUPPORTED_ARCHITECTURES = (
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
    "OlmoeForCausalLM",
    "Llama4ForCausalLM",
    "GptOssForCausalLM",
    "DeepseekV3ForCausalLM",
)

Routing = Literal["softmax_topk", "sigmoid_topk", "topk_softmax", "sigmoid_group"]
QKNorm = Literal["none", "head", "full", "l2"]
RopeStyle = Literal["half", "interleaved"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_style: RopeStyle
    # per layer
    use_rope: tuple[bool, ...]
    chunk_size: tuple[int | None, ...]  # chunked local attention (Llama-4 iRoPE); None: global
    moe_layers: tuple[bool, ...]
    # attention details
    qkv_bias: bool = False
    qk_norm: QKNorm = "none"
    clip_qkv: float | None = None
    sliding_window: int | None = None
    window_layers: tuple[bool, ...] | None = None  # layers the window applies to (None: every layer)
    o_bias: bool = False
    attention_sinks: bool = False  # GPT-OSS: a learned per-head logit in every softmax denominator
    attn_temperature_tuning: bool = False  # Llama-4 NoPE layers scale q by position
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    # experts
    num_experts: int = 0
    top_k: int = 1
    routing: Routing = "softmax_topk"
    norm_topk_prob: bool = False
    expert_input_scaling: bool = False  # Llama-4 multiplies the expert input by its score
    router_bias: bool = False
    expert_bias: bool = False
    swiglu_clamp: tuple[float, float] | None = None  # GPT-OSS clamped SwiGLU: (alpha, limit)
    # DeepSeek-V3: latent attention (num_kv_heads 1, head_dim = the latent width) and its routing
    mla: LatentDims | None = None
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
    dense_intermediate_size: int = 0
    router_aux_loss_coef: float = 0.0
    tie_word_embeddings: bool = False
    eos_token_id: tuple[int, ...] = ()
    bos_token_id: int | None = None
    max_position_embeddings: int = 1 << 20
    rope_scaling: RopeScaling = RopeScaling()  # linear / llama3 / yarn (model/rope.py)
    hf_config: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.hidden_size <= 0 or self.num_layers <= 0 or self.vocab_size <= 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}), num_layers ({self.num_layers}) and "
                f"vocab_size ({self.vocab_size}) must be positive"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        for name in ("use_rope", "chunk_size", "moe_layers"):
            if len(getattr(self, name)) != self.num_layers:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries; the model has {self.num_layers} layers")
        if self.window_layers is not None and len(self.window_layers) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.window_layers)} entries; the model has {self.num_layers} layers")
        if any(self.moe_layers) and not (1 <= self.top_k <= self.num_experts):
            raise ValueError(f"num_experts_per_tok ({self.top_k}) must be in 1..num_experts ({self.num_experts})")

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def attn_scale_factor(self) -> float:
        if self.mla is not None:
            return self.mla.softmax_scale(self.rope_scaling)
        return 1.0 / math.sqrt(self.head_dim)

    @property
    def rope_dim(self) -> int:
        """Dimensions RoPE rotates per head (MLA: the decoupled rope dims only)."""
        return self.mla.qk_rope_head_dim if self.mla is not None else self.head_dim

    @property
    def kv_latent(self) -> bool:
        """The KV cache holds one latent vector per token and layer that is both key and value."""
        return self.mla is not None

    @property
    def alignment(self) -> int:
        """Token multiple that segment boundaries should respect (chunked-local layers)."""
        chunks = [c for c in self.chunk_size if c]
        return math.lcm(*chunks) if chunks else 1

    def attention_spec(self, layer: int) -> AttentionSpec:
        windowed = self.window_layers is None or self.window_layers[layer]
        return AttentionSpec(self.attn_scale_factor, self.chunk_size[layer], self.sliding_window if windowed else None)

    def kv_bytes_per_token(self, bytes_per_value: int = 4) -> int:
        """Stored K/V bytes per token, all layers (a latent layout stores one vector, not two)."""
        return self.num_layers * (1 if self.kv_latent else 2) * self.num_kv_heads * self.head_dim * bytes_per_value

    def expanded_kv_bytes_per_token(self, bytes_per_value: int = 4) -> int:
        """The same in the expanded form Hugging Face caches (MLA: per-head K and V)."""
        if self.mla is None:
            return self.kv_bytes_per_token(bytes_per_value)
        return self.num_layers * self.mla.expanded_values(self.num_heads) * bytes_per_value

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitecture(
                f"architecture {arch!r} (model_type {cfg.get('model_type')!r}) is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if cfg.get("quantization_config"):
            q = cfg["quantization_config"]
            method = q.get("quant_method") if isinstance(q, dict) else q
            raise UnsupportedArchitecture(
                f"quantized checkpoints ({method!r}) are not supported; load weights in bf16 or fp32. "
                "For GPT-OSS's MXFP4 experts, dequantize once with transformers: "
                "`AutoModelForCausalLM.from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True), "
                "torch_dtype=torch.bfloat16).save_pretrained(out)` and serve `out`")
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedArchitecture(f"hidden_act {cfg['hidden_act']!r} is not supported; supported: 'silu'")
        return _PARSERS[arch](cfg)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        """config.json, with the eos ids of generation_config.json beside it (generation stops at
        either, as transformers' generate and vLLM do)."""
        from expertmesh.model.generation_config import eos_ids, read

        cfg = json.loads(Path(path).read_text())
        extra = eos_ids(read(Path(path).parent))
        if extra:
            cfg = {**cfg, "eos_token_id": list(dict.fromkeys(_eos_list(cfg) + extra))}
        return cls.from_hf(cfg)


_DEFAULT_THETA = {"GptOssForCausalLM": 150000.0}  # transformers' per-architecture defaults


def _rope_theta(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters") or {}
    arch = (cfg.get("architectures") or [None])[0]
    return float(params.get("rope_theta", cfg.get("rope_theta", _DEFAULT_THETA.get(arch, 10000.0))))


def _rope_scaling(cfg: dict[str, Any]) -> RopeScaling:
    try:
        return RopeScaling.from_hf(cfg)
    except ValueError as exc:
        raise UnsupportedArchitecture(str(exc)) from None


def _eos_list(cfg: dict[str, Any]) -> list[int]:
    eos = cfg.get("eos_token_id")
    return [int(i) for i in (eos if isinstance(eos, list) else ([] if eos is None else [eos]))]


def _eos(cfg: dict[str, Any]) -> tuple[int, ...]:
    return tuple(i for i in _eos_list(cfg) if 0 <= i < cfg["vocab_size"])


def _common(cfg: dict[str, Any], arch: str) -> dict[str, Any]:
    n = cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    return dict(
        architecture=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_layers=n,
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(cfg),
        rope_scaling=_rope_scaling(cfg),
        rope_style="half",
        use_rope=(True,) * n,
        chunk_size=(None,) * n,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        eos_token_id=_eos(cfg),
        bos_token_id=cfg.get("bos_token_id"),
        router_aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.0)),
        max_position_embeddings=cfg.get("max_position_embeddings", 1 << 20),
        hf_config=dict(cfg),
    )


def _num_experts(cfg: dict[str, Any]) -> int:
    return int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)


def _sparse_layers(cfg: dict[str, Any]) -> tuple[bool, ...]:
    step = cfg.get("decoder_sparse_step", 1) or 1
    only_mlp = set(cfg.get("mlp_only_layers") or [])
    return tuple(
        i not in only_mlp and _num_experts(cfg) > 0 and (i + 1) % step == 0
        for i in range(cfg["num_hidden_layers"])
    )


def _window(cfg: dict[str, Any], flag: str | None = None) -> int | None:
    if flag is not None and not cfg.get(flag, False):
        return None
    return cfg.get("sliding_window") or None


def _mixtral(cfg: dict[str, Any]) -> ModelConfig:
    n = cfg["num_hidden_layers"]
    return ModelConfig(
        **_common(cfg, "MixtralForCausalLM"),
        moe_layers=(True,) * n,
        sliding_window=_window(cfg),
        num_experts=cfg["num_local_experts"],
        top_k=cfg["num_experts_per_tok"],
        norm_topk_prob=True,
        moe_intermediate_size=cfg["intermediate_size"],
    )


def _qwen2moe(cfg: dict[str, Any]) -> ModelConfig:
    if cfg.get("use_sliding_window"):
        raise UnsupportedArchitecture("Qwen2-MoE with use_sliding_window=true is not supported")
    return ModelConfig(
        **_common(cfg, "Qwen2MoeForCausalLM"),
        moe_layers=_sparse_layers(cfg),
        qkv_bias=bool(cfg.get("qkv_bias", True)),
        num_experts=_num_experts(cfg),
        top_k=cfg["num_experts_per_tok"],
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        moe_intermediate_size=cfg["moe_intermediate_size"],
        shared_expert_intermediate_size=cfg.get("shared_expert_intermediate_size", 0),
        shared_expert_gate=cfg.get("shared_expert_intermediate_size", 0) > 0,
        dense_intermediate_size=cfg["intermediate_size"],
    )


def _qwen3moe(cfg: dict[str, Any]) -> ModelConfig:
    if cfg.get("use_sliding_window"):
        raise UnsupportedArchitecture("Qwen3-MoE with use_sliding_window=true is not supported")
    return ModelConfig(
        **_common(cfg, "Qwen3MoeForCausalLM"),
        moe_layers=_sparse_layers(cfg),
        qkv_bias=bool(cfg.get("attention_bias", False)),
        qk_norm="head",
        num_experts=_num_experts(cfg),
        top_k=cfg["num_experts_per_tok"],
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        moe_intermediate_size=cfg["moe_intermediate_size"],
        dense_intermediate_size=cfg["intermediate_size"],
    )


def _olmoe(cfg: dict[str, Any]) -> ModelConfig:
    n = cfg["num_hidden_layers"]
    return ModelConfig(
        **_common(cfg, "OlmoeForCausalLM"),
        moe_layers=(True,) * n,
        qkv_bias=bool(cfg.get("attention_bias", False)),
        qk_norm="full",
        clip_qkv=cfg.get("clip_qkv"),
        num_experts=_num_experts(cfg),
        top_k=cfg["num_experts_per_tok"],
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        moe_intermediate_size=cfg["intermediate_size"],
    )


def _llama4(cfg: dict[str, Any]) -> ModelConfig:
    n = cfg["num_hidden_layers"]
    no_rope = cfg.get("no_rope_layers") or [int((i + 1) % cfg.get("no_rope_layer_interval", 4) != 0) for i in range(n)]
    use_rope = tuple(bool(x) for x in no_rope)
    chunk = cfg.get("attention_chunk_size")
    layer_types = cfg.get("layer_types") or [
        "chunked_attention" if r else "full_attention" for r in use_rope
    ]
    chunk_size = tuple(chunk if t == "chunked_attention" and chunk else None for t in layer_types)
    moe_layers = set(cfg.get("moe_layers") or list(range(cfg.get("interleave_moe_layer_step", 1) - 1, n, cfg.get("interleave_moe_layer_step", 1))))
    common = _common(cfg, "Llama4ForCausalLM")
    common.update(rope_style="interleaved", use_rope=use_rope, chunk_size=chunk_size)
    return ModelConfig(
        **common,
        moe_layers=tuple(i in moe_layers for i in range(n)),
        qkv_bias=bool(cfg.get("attention_bias", False)),
        qk_norm="l2" if cfg.get("use_qk_norm", True) else "none",
        attn_temperature_tuning=bool(cfg.get("attn_temperature_tuning", True)),
        floor_scale=float(cfg.get("floor_scale", 8192)),
        attn_scale=float(cfg.get("attn_scale", 0.1)),
        num_experts=cfg["num_local_experts"],
        top_k=cfg.get("num_experts_per_tok", 1),
        routing="sigmoid_topk",
        expert_input_scaling=True,
        moe_intermediate_size=cfg["intermediate_size"],
        shared_expert_intermediate_size=cfg["intermediate_size"],
        dense_intermediate_size=cfg.get("intermediate_size_mlp", cfg["intermediate_size"]),
    )


def _gpt_oss(cfg: dict[str, Any]) -> ModelConfig:
    n = cfg["num_hidden_layers"]
    types = cfg.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise UnsupportedArchitecture(f"GPT-OSS layer_types {unknown} are not supported; "
                                      "supported: 'sliding_attention', 'full_attention'")
    window = cfg.get("sliding_window") or None
    bias = bool(cfg.get("attention_bias", True))
    return ModelConfig(
        **_common(cfg, "GptOssForCausalLM"),
        moe_layers=(True,) * n,
        sliding_window=window,
        window_layers=tuple(t == "sliding_attention" for t in types) if window else None,
        qkv_bias=bias,
        o_bias=bias,
        attention_sinks=True,
        num_experts=cfg["num_local_experts"],
        top_k=cfg.get("num_experts_per_tok", 4),
        routing="topk_softmax",
        router_bias=True,
        expert_bias=True,
        swiglu_clamp=(float(cfg.get("swiglu_alpha", 1.702)), float(cfg.get("swiglu_limit", 7.0))),
        moe_intermediate_size=cfg["intermediate_size"],
    )


def _deepseek_v3(cfg: dict[str, Any]) -> ModelConfig:
    n = cfg["num_hidden_layers"]
    if cfg.get("topk_method", "noaux_tc") != "noaux_tc" or cfg.get("scoring_func", "sigmoid") != "sigmoid":
        raise UnsupportedArchitecture(
            f"DeepSeek routing topk_method={cfg.get('topk_method')!r} scoring_func={cfg.get('scoring_func')!r} "
            "is not supported; supported: 'noaux_tc' with 'sigmoid' (DeepSeek-V3, Kimi-K2)")
    dims = LatentDims(cfg.get("q_lora_rank") or None, cfg["kv_lora_rank"], cfg["qk_nope_head_dim"],
                      cfg["qk_rope_head_dim"], cfg["v_head_dim"])
    experts = cfg["n_routed_experts"]
    groups = cfg.get("n_group") or 1
    if experts % groups or not 1 <= (cfg.get("topk_group") or 1) <= groups:
        raise UnsupportedArchitecture(f"n_routed_experts ({experts}) must split into n_group ({groups}) groups "
                                      f"and topk_group ({cfg.get('topk_group')}) be in 1..n_group")
    if experts // groups < 2:
        raise UnsupportedArchitecture(f"DeepSeek group routing scores a group by its top 2 experts: "
                                      f"n_routed_experts / n_group must be >= 2, got {experts // groups}")
    common = _common(cfg, "DeepseekV3ForCausalLM")
    dense = cfg.get("first_k_dense_replace", 0)
    common.update(num_kv_heads=1, head_dim=dims.latent_dim,
                  rope_style="interleaved" if cfg.get("rope_interleave", True) else "half")
    bias = bool(cfg.get("attention_bias", False))
    return ModelConfig(
        **common,
        mla=dims,
        moe_layers=tuple(i >= dense for i in range(n)),
        qkv_bias=bias,
        o_bias=bias,
        num_experts=experts,
        top_k=cfg["num_experts_per_tok"],
        routing="sigmoid_group",
        n_group=groups,
        topk_group=cfg.get("topk_group") or 1,
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        moe_intermediate_size=cfg["moe_intermediate_size"],
        shared_expert_intermediate_size=cfg["moe_intermediate_size"] * (cfg.get("n_shared_experts") or 0),
        dense_intermediate_size=cfg["intermediate_size"],
    )


_PARSERS = {
    "MixtralForCausalLM": _mixtral,
    "Qwen2MoeForCausalLM": _qwen2moe,
    "Qwen3MoeForCausalLM": _qwen3moe,
    "OlmoeForCausalLM": _olmoe,
    "Llama4ForCausalLM": _llama4,
    "GptOssForCausalLM": _gpt_oss,
    "DeepseekV3ForCausalLM": _deepseek_v3,
}
