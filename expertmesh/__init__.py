"""expertmesh: serve and train sparse MoE transformers over long shared contexts on Ray.

    import expertmesh as em
    mesh = em.Mesh.start()  # or em.Mesh.start(spec=em.MeshSpec(context_shards=4, expert_groups=2))
    ctx = mesh.register_context(mesh.tokenizer.encode(long_text))
    res = mesh.generate(mesh.tokenizer.encode(question), context_id=ctx.id)
"""

from expertmesh.errors import (
    CapacityError,
    CheckpointError,
    ContextNotFound,
    DeviceError,
    ExpertMeshError,
    InvalidRequest,
    MeshActorError,
    NoTokenizer,
    PlacementError,
    Unavailable,
    UnsupportedArchitecture,
)
from expertmesh.model.checkpoint import load_model, save_model
from expertmesh.model.config import SUPPORTED_ARCHITECTURES, ModelConfig
from expertmesh.mesh_spec import MeshSpec
from expertmesh.platform.mesh import GenerationResult, Mesh
from expertmesh.store.registry import ContextInfo

__all__ = [
    "CapacityError", "CheckpointError", "ContextInfo", "ContextNotFound", "DeviceError", "ExpertMeshError",
    "GenerationResult", "InvalidRequest", "Mesh", "MeshActorError", "MeshSpec", "ModelConfig", "NoTokenizer", "PlacementError", "SUPPORTED_ARCHITECTURES",
    "Unavailable", "UnsupportedArchitecture",
    "load_model", "save_model",
]
