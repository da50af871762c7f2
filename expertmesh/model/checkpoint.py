"""Hugging Face checkpoint directories: config.json + safetensors (sharded index allowed).

`load_model(path)` builds the single-process model. Partial loads (`experts=`,
`with_experts=False`) read only the tensors an actor holds. Never unpickles anything.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open

from expertmesh.errors import CheckpointError
from expertmesh.model.config import ModelConfig
from expertmesh.model.device import resolve_device, resolve_dtype
from expertmesh.model.moe import ExpertBank, expert_bank
from expertmesh.model.rope import rope_frequencies
from expertmesh.model.transformer import MoETransformer

_MOE_PREFIX = {
    "MixtralForCausalLM": "block_sparse_moe",
    "Qwen2MoeForCausalLM": "mlp",
    "Qwen3MoeForCausalLM": "mlp",
    "OlmoeForCausalLM": "mlp",
    "Llama4ForCausalLM": "feed_forward",
    "GptOssForCausalLM": "mlp",
    "DeepseekV3ForCausalLM": "mlp",
}
_SHARED_NAME = {"DeepseekV3ForCausalLM": "shared_experts"}  # default: "shared_expert"
_ROUTER_NAME = {"Llama4ForCausalLM": "router", "GptOssForCausalLM": "router"}  # default: "gate"
_EXPERT_NAMES = {  # local -> per-expert HF name
    "MixtralForCausalLM": {"gate": "w1", "up": "w3", "down": "w2"},
}
_DEFAULT_EXPERT_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def open_filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a URI such as s3://bucket/dir or gs://bucket/dir."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A local directory for a path or `file://`, `s3://`, `gs://` URI (copied once to a cache)."""
    text = str(path)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if "://" not in text:
        p = Path(text).expanduser()
        if not (p / "config.json").is_file():
            raise CheckpointError(f"checkpoint {p}: no config.json (expected a Hugging Face model directory)")
        return p
    import hashlib

    import pyarrow.fs as pafs

    cache = Path(os.environ.get("EXPERTMESH_CACHE", Path.home() / ".cache" / "expertmesh"))
    local = cache / "checkpoints" / hashlib.sha256(text.encode()).hexdigest()[:16]
    if not (local / "config.json").is_file():
        fs, root = open_filesystem(text)
        tmp = local.with_suffix(".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for info in fs.get_file_info(pafs.FileSelector(root, recursive=False)):
            if info.type == pafs.FileType.File:
                with fs.open_input_stream(info.path) as src, open(tmp / info.base_name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        tmp.rename(local)
    return local


def load_config(path: str | os.PathLike) -> ModelConfig:
    return ModelConfig.from_file(resolve_checkpoint(path) / "config.json")


class _Tensors:
    """Lazy access to the tensors of a checkpoint, across shards."""

    def __init__(self, root: Path) -> None:
        self.root = root
        index = root / "model.safetensors.index.json"
        if index.is_file():
            self.where = json.loads(index.read_text())["weight_map"]
        elif (root / "model.safetensors").is_file():
            with safe_open(root / "model.safetensors", "pt") as f:
                self.where = {k: "model.safetensors" for k in f.keys()}
        else:
            raise CheckpointError(f"checkpoint {root}: no model.safetensors or model.safetensors.index.json")
        self._open: dict[str, object] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def _file(self, key: str):
        if key not in self.where:
            raise CheckpointError(f"checkpoint {self.root}: tensor {key!r} is missing")
        name = self.where[key]
        if name not in self._open:
            file = self.root / name
            if not file.is_file():
                raise CheckpointError(f"checkpoint {self.root}: safetensors shard {name} is missing (needed for {key})")
            self._open[name] = safe_open(file, "pt")
        return self._open[name]

    def get(self, key: str) -> torch.Tensor:
        return self._file(key).get_tensor(key)

    def slice(self, key: str):
        return self._file(key).get_slice(key)


def _expert_tensors(t: _Tensors, cfg: ModelConfig, layer: int, held: range) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    pre = f"model.layers.{layer}.{_MOE_PREFIX[cfg.architecture]}.experts"
    inter = cfg.moe_intermediate_size
    if cfg.architecture == "GptOssForCausalLM":  # gate_up [E, H, 2I] with gate / up interleaved (::2, 1::2)
        def interleaved(name: str, part: int, bias: bool) -> torch.Tensor:
            gu = t.slice(f"{pre}.{name}")[held.start:held.stop][..., part::2]  # [E, H, I] or [E, I]
            return (gu if bias else gu.transpose(1, 2)).contiguous()

        yield "gate", lambda: interleaved("gate_up_proj", 0, False)
        yield "up", lambda: interleaved("gate_up_proj", 1, False)
        yield "down", lambda: t.slice(f"{pre}.down_proj")[held.start:held.stop].transpose(1, 2).contiguous()
        yield "gate_bias", lambda: interleaved("gate_up_proj_bias", 0, True)
        yield "up_bias", lambda: interleaved("gate_up_proj_bias", 1, True)
        yield "down_bias", lambda: t.slice(f"{pre}.down_proj_bias")[held.start:held.stop]
        return
    if f"{pre}.gate_up_proj" in t:  # packed layout [E, H, 2I] (Llama-4) or [E, 2I, H]
        def packed(part: str) -> torch.Tensor:
            gu = t.slice(f"{pre}.gate_up_proj")[held.start:held.stop]
            if gu.shape[-1] == 2 * inter and gu.shape[1] == cfg.hidden_size:
                gu = gu.transpose(1, 2)  # -> [E, 2I, H]
            return (gu[:, :inter] if part == "gate" else gu[:, inter:]).contiguous()

        def down() -> torch.Tensor:
            d = t.slice(f"{pre}.down_proj")[held.start:held.stop]
            if d.shape[1] == inter:  # [E, I, H] -> [E, H, I]
                d = d.transpose(1, 2)
            return d.contiguous()

        yield "gate", lambda: packed("gate")
        yield "up", lambda: packed("up")
        yield "down", down
        return
    names = _EXPERT_NAMES.get(cfg.architecture, _DEFAULT_EXPERT_NAMES)
    for local, hf in names.items():
        yield local, lambda hf=hf: torch.stack([t.get(f"{pre}.{e}.{hf}.weight") for e in held]) if len(held) else torch.empty(0)


def _hf_name(cfg: ModelConfig, local: str) -> str:
    """Local parameter name -> Hugging Face tensor name (non-expert parameters)."""
    if local == "embed.weight":
        return "model.embed_tokens.weight"
    if local in ("norm.weight", "lm_head.weight"):
        return local if local.startswith("lm_head") else "model.norm.weight"
    _, i, rest = local.split(".", 2)
    base = f"model.layers.{i}"
    moe = _MOE_PREFIX[cfg.architecture]
    first = rest.split(".")[0]
    if first == "attn_norm":
        return f"{base}.input_layernorm.weight"
    if first == "mlp_norm":
        return f"{base}.post_attention_layernorm.weight"
    if first in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "sinks"):
        return f"{base}.self_attn.{rest}"
    if first == "mla":  # latent attention: Hugging Face's own names under self_attn
        return f"{base}.self_attn.{rest.split('.', 1)[1]}"
    if first == "gate_correction":
        return f"{base}.{moe}.gate.e_score_correction_bias"
    if first == "gate":
        return f"{base}.{moe}.{_ROUTER_NAME.get(cfg.architecture, 'gate')}.{rest.split('.')[-1]}"
    if first == "shared_expert":
        return f"{base}.{moe}.{_SHARED_NAME.get(cfg.architecture, 'shared_expert')}.{rest.split('.', 1)[1]}"
    if first == "shared_expert_gate":
        return f"{base}.{moe}.{rest}"
    if first == "mlp":
        return f"{base}.{moe}.{rest.split('.', 1)[1]}"
    raise KeyError(local)


def hf_name_map(model: MoETransformer) -> dict[str, str]:
    """Local non-expert parameter name -> Hugging Face tensor name."""
    return {
        n: _hf_name(model.cfg, n) for n, _ in model.named_parameters(remove_duplicate=True)
        if ".experts." not in n
    }


def _placement(dtype: torch.dtype | str, device: torch.device | str) -> tuple[torch.dtype, torch.device]:
    """("auto" | name | torch.dtype, "auto" | "cpu" | "cuda[:N]" | torch.device) -> resolved pair."""
    dev = resolve_device(device)
    return resolve_dtype(dtype, dev), dev


def load_model(path: str | os.PathLike, experts: range | None = None, with_experts: bool = True,
               dtype: torch.dtype | str = torch.float32, device: torch.device | str = "cpu") -> MoETransformer:
    """Build the single-process model from a checkpoint directory or URI.

    Every weight (norm scales included, as Hugging Face's `model.to(dtype)` does) lands on
    `device` in `dtype`; the RoPE frequencies stay fp32. Strings as in model/device.py.
    """
    dtype, device = _placement(dtype, device)
    root = resolve_checkpoint(path)
    cfg = ModelConfig.from_file(root / "config.json")
    t = _Tensors(root)
    with torch.device("meta"):
        model = MoETransformer(cfg, experts=experts, with_experts=with_experts)
    state: dict[str, torch.Tensor] = {}
    for local, hf in hf_name_map(model).items():
        if local == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        state[local] = t.get(hf)
    for i, layer in enumerate(model.layers):
        if layer.is_moe:
            held = range(layer.experts.first, layer.experts.first + layer.experts.count)
            for local, get in _expert_tensors(t, cfg, i, held):
                state[f"layers.{i}.experts.{local}"] = get() if len(held) else torch.empty(
                    getattr(layer.experts, local).shape)
    model.to_empty(device=device)
    model.to(dtype)  # parameters are still uninitialised here: this only sets their dtype
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    missing, unexpected = model.load_state_dict(state, strict=False)  # copies cast to each parameter's dtype
    missing = [m for m in missing if not (m == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {root}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for layer in model.layers:  # buffers are not in checkpoints: rebuild them, fp32 whatever the dtype
        freqs, layer.rope_scale = rope_frequencies(cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling)
        layer.freqs = freqs.to(device)
    return model.eval()


def hf_state_dict(model: MoETransformer) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face names (all experts must be held)."""
    cfg = model.cfg
    out = {hf: p.detach().contiguous() for n, hf in hf_name_map(model).items()
           for p in [model.get_parameter(n)]}
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    for i, layer in enumerate(model.layers):
        if not layer.is_moe:
            continue
        bank = layer.experts
        if bank.count != cfg.num_experts:
            raise ValueError(f"layer {i} holds {bank.count} of {cfg.num_experts} experts; save needs all")
        pre = f"model.layers.{i}.{_MOE_PREFIX[cfg.architecture]}.experts"
        if cfg.architecture == "GptOssForCausalLM":  # interleaved [E, H, 2I] (+ [E, 2I] bias), [E, I, H]
            gu = torch.stack([bank.gate.transpose(1, 2), bank.up.transpose(1, 2)], -1).flatten(-2)
            out[f"{pre}.gate_up_proj"] = gu.detach().contiguous()
            out[f"{pre}.gate_up_proj_bias"] = torch.stack([bank.gate_bias, bank.up_bias], -1).flatten(-2).detach()
            out[f"{pre}.down_proj"] = bank.down.transpose(1, 2).detach().contiguous()
            out[f"{pre}.down_proj_bias"] = bank.down_bias.detach().contiguous()
            continue
        if cfg.architecture == "Llama4ForCausalLM":  # packed [E, H, 2I] and [E, I, H]
            out[f"{pre}.gate_up_proj"] = torch.cat([bank.gate, bank.up], 1).transpose(1, 2).detach().contiguous()
            out[f"{pre}.down_proj"] = bank.down.transpose(1, 2).detach().contiguous()
            continue
        names = _EXPERT_NAMES.get(cfg.architecture, _DEFAULT_EXPERT_NAMES)
        for local, hf in names.items():
            for e in range(bank.count):
                out[f"{pre}.{e}.{hf}.weight"] = getattr(bank, local)[e].detach().contiguous()
    return out


def save_model(model: MoETransformer, path: str | os.PathLike) -> Path:
    """Write config.json + model.safetensors in Hugging Face layout."""
    from safetensors.torch import save_file

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(model.cfg.hf_config, indent=2, sort_keys=True))
    save_file({k: v.float().cpu() for k, v in hf_state_dict(model).items()}, str(root / "model.safetensors"),
              metadata={"format": "pt"})
    return root


def load_experts(path: str | os.PathLike, held: range, dtype: torch.dtype | str = torch.float32,
                 device: torch.device | str = "cpu", layers: set[int] | None = None) -> dict[int, ExpertBank]:
    """Experts `held` of every MoE layer (what one expert group holds), or of `layers` only:
    {layer: ExpertBank}.

    The weights land on `device` in `dtype` (strings as in model/device.py).
    """
    dtype, device = _placement(dtype, device)
    root = resolve_checkpoint(path)
    cfg = ModelConfig.from_file(root / "config.json")
    t = _Tensors(root)
    banks: dict[int, ExpertBank] = {}
    for i in range(cfg.num_layers):
        if not cfg.moe_layers[i] or (layers is not None and i not in layers):
            continue
        with torch.device("meta"):
            bank = expert_bank(cfg, held)
        bank = bank.to_empty(device=device).to(dtype)
        with torch.no_grad():
            for local, get in _expert_tensors(t, cfg, i, held) if len(held) else ():  # (none: an empty bank)
                getattr(bank, local).copy_(get())  # host -> device, cast to dtype
        banks[i] = bank.eval().requires_grad_(False)
    return banks
