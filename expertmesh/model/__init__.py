"""Pure PyTorch, single-process MoE transformer. Never imports ray."""

from expertmesh.model.attention import AttentionSpec, merge_partials, partial_attention
from expertmesh.model.checkpoint import load_config, load_model, resolve_checkpoint
from expertmesh.model.config import SUPPORTED_ARCHITECTURES, ModelConfig
from expertmesh.model.transformer import MoETransformer

__all__ = [
    "AttentionSpec", "ModelConfig", "MoETransformer", "SUPPORTED_ARCHITECTURES",
    "load_config", "load_model", "merge_partials", "partial_attention", "resolve_checkpoint",
]
