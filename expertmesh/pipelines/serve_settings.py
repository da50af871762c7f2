"""What the serving app is built from: serve config `args`, CLI flags and Helm values, validated."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from expertmesh.platform.tenancy import TenantsFile


class ServeSettings(BaseModel):
    """What the serving app is built from (serve config `args`, CLI flags, Helm values)."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: str | None = Field(None, description="HF model directory or URI; None: the built-in model")
    context_shards: int | None = Field(None, ge=1, description="context shard actors; None: picked from the "
                                       "hardware (with colocate, one worker per GPU or per 4 CPUs)")
    expert_groups: int | None = Field(None, ge=1, description="expert group actors; None: picked as context_shards")
    tenants_file: str | None = Field(None, description="tenants YAML; None: one anonymous tenant, no keys")
    tenants: TenantsFile | None = Field(None, description="tenants inline (instead of tenants_file)")
    model_name: str = Field("expertmesh", description="the model id clients pass as `model`")
    max_queue: int = Field(256, ge=1, description="requests admitted at once over all tenants; more get 503")
    max_prompt_tokens: int = Field(131072, ge=1, description="prompt tokens per request")
    max_completion_tokens: int = Field(4096, ge=1, description="max_tokens per request")
    shard_capacity_tokens: int | None = Field(None, ge=1, description="cap on context tokens each shard holds; "
                                                                          "None: bounded by the store")
    store: str | None = Field(None, description="context store: a directory (e.g. a PVC mount) or URI "
                                                "(s3://, gs://, file://); contexts survive restarts. None: none")
    shard_memory_bytes: int | None = Field(None, ge=1, description="hot KV pages per shard in memory; "
                                                                   "None: an eighth of the host's memory, on "
                                                                   "a GPU 90% of the free share of it")
    kv_dtype: Literal["float32", "bfloat16"] = Field("float32", description="how KV pages are stored")
    shard_backend: Literal["torch", "jax"] = Field("torch", description="what context shards compute with "
                                                   "(jax: TPU or JAX hosts; pip install 'expertmesh[jax]')")
    expert_backend: Literal["torch", "jax"] = Field("torch", description="what expert groups compute with "
                                                    "(jax: TPU or JAX hosts; pip install 'expertmesh[jax]')")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda|cuda:\d+)$",
                        description="where weights and KV live: auto (a GPU where the actor sees one), cpu, "
                                    "cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights and activations (auto: bfloat16 on CUDA, float32 on CPU); softmax "
                            "statistics and the merge of partial attention stay float32")
    colocate: bool | None = Field(None, description="one context shard and one expert group per actor (per "
                                  "accelerator); None: colocated when no count is given, else separate actors")
    data_plane: Literal["collective", "ray"] = Field(
        "collective", description="per-layer tensors point to point between the router and the actors (NCCL on "
                                  "GPUs, authenticated TCP/Unix sockets on CPUs) or over Ray calls")
    routers: int = Field(1, ge=1, description="router actors of the mesh: requests spread over them (least busy), "
                                              "one that dies fails over to another")
    micro_batches: int = Field(1, ge=1, le=2, description="2: each router step runs its requests as two halves in "
                               "ping-pong (one computes while the other's rows are at the shards and expert groups); "
                               "the same logits either way")
    whole_steps: bool = Field(True, description="where one colocated worker holds every shard and expert group, "
                              "each step goes to it whole (one round trip a step); the same logits either way")
    mesh_name: str = Field("expertmesh", min_length=1, description="name of the mesh every replica shares and "
                           "ingestion jobs attach to (Mesh.attach)")
    start_timeout_s: float = Field(300.0, gt=0, description="bound on starting (or waiting for) the mesh")

    def mesh_spec(self):
        """The MeshSpec of the mesh every replica shares (mesh_spec.py)."""
        import dataclasses

        from expertmesh.mesh_spec import MeshSpec

        mine = type(self).model_fields  # every field the two share, by name
        return MeshSpec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(MeshSpec) if f.name in mine})

    def placement_kwargs(self) -> dict[str, Any]:
        """device, dtype, colocate, data_plane, routers for Mesh.start."""
        return {k: getattr(self, k) for k in ("device", "dtype", "colocate", "data_plane", "routers")}
