"""`Mesh`: the driver-side handle of a running expertmesh deployment."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import ray

from expertmesh.actors.context_shard import RemoteContextShard
from expertmesh.actors.expert_group import RemoteExpertGroup
from expertmesh.actors.router import RemoteRouter
from expertmesh.jax_backend import check_backend, check_jax_installed
from expertmesh.model.checkpoint import resolve_checkpoint
from expertmesh.model.config import ModelConfig
from expertmesh.model.default import default_checkpoint
from expertmesh.model.moe import expert_partition
from expertmesh.model.tokenizer import Tokenizer, load_tokenizer
from expertmesh.platform.cluster import CONTEXT_SHARD, EXPERT_GROUP, actor_options, connect, threads_per_actor
from expertmesh.store.fingerprint import model_fingerprint
from expertmesh.store.location import StoreLocation
from expertmesh.store.pages import KV_DTYPES
from expertmesh.store.registry import ContextInfo


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    request_id: str
    token_ids: list[int]
    text: str
    pathway: dict
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    context_tokens: int
    ttft_s: float | None
    total_s: float


def _unwrap(fn):
    """Re-raise an actor's exception as itself (ContextNotFound, ValueError, ...)."""
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


NAMESPACE = "expertmesh"  # where named meshes' routers live, for Mesh.attach


class Mesh:
    """Context shards + expert groups + a router, as Ray actors."""

    def __init__(self, router, shards: list, groups: list, config: ModelConfig, tokenizer: Tokenizer,
                 checkpoint: Path, started_ray: bool, owned: bool = True) -> None:
        self.router, self.shards, self.groups = router, shards, groups
        self.config, self.tokenizer, self.checkpoint = config, tokenizer, checkpoint
        self._started_ray, self._owned = started_ray, owned

    @classmethod
    def start(cls, checkpoint: str | os.PathLike | None = None, context_shards: int = 4, expert_groups: int = 2,
              address: str | None = None, shard_capacity_tokens: int | None = None, page_size: int = 64,
              max_batch_tokens: int = 16384, lanes: int = 2, compiled_graphs: bool = False,
              name: str | None = None, store: str | os.PathLike | None = None,
              shard_memory_bytes: int | None = None, kv_dtype: str = "float32", shard_backend: str = "torch",
              expert_backend: str = "torch") -> "Mesh":
        """Start the actors on a local Ray cluster (address=None) or join one ("auto" or a URL).

        store: a directory or URI (`file://`, `s3://`, `gs://`) holding the contexts' KV pages
        and manifests: contexts survive restarts and may be larger than memory. None: each
        shard keeps its pages in a scratch directory of its host, lost with the shard.
        shard_memory_bytes: each shard's budget of hot pages in memory (None: an eighth of
        its host's memory); the rest are read from the store on demand.
        kv_dtype: "float32" or "bfloat16", how KV pages are stored (attention accumulates in fp32).
        shard_capacity_tokens: a cap on the tokens each shard holds (None: bounded by the store).
        shard_backend / expert_backend: "torch" or "jax", what the context shards / expert groups
        compute with ("jax": KV pages and experts as JAX arrays on each actor's JAX device, e.g.
        a TPU host; `pip install 'expertmesh[jax]'`). Either mix gives the same answers.

        lanes: router step loops that overlap one batch's compute with another's remote calls.
        compiled_graphs: the router's per-layer fan-outs to shards and groups run over Ray
        Compiled Graphs (less Ray overhead per call; built on first use).
        name: register the router under this name so other drivers and jobs can
        `Mesh.attach(name)` (e.g. an ingestion job adding contexts to a serving mesh).
        """
        if context_shards < 1:
            raise ValueError(f"context_shards must be >= 1, got {context_shards}")
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
        check_backend("shard_backend", shard_backend)
        check_backend("expert_backend", expert_backend)
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if shard_memory_bytes is not None and shard_memory_bytes < 1:
            raise ValueError(f"shard_memory_bytes must be >= 1 or None, got {shard_memory_bytes}")
        store = None if store is None else str(store)
        path = default_checkpoint() if checkpoint is None else resolve_checkpoint(checkpoint)
        config = ModelConfig.from_file(path / "config.json")
        partition = expert_partition(config.num_experts, expert_groups) if any(config.moe_layers) else []
        fingerprint = None
        if store is not None:  # refuse a store of other weights before any actor starts
            fingerprint = model_fingerprint(path)
            StoreLocation(store).bind(fingerprint, {"architecture": config.architecture, "checkpoint": str(path)})
        if address is None and "jax" in (shard_backend, expert_backend):
            check_jax_installed()  # a local cluster's actors import what this process can import
        started = connect(address, context_shards, expert_groups)
        threads = threads_per_actor(context_shards + expert_groups + 1)
        specs = [config.attention_spec(i) for i in range(config.num_layers)]
        shard_cls = RemoteContextShard
        if shard_backend == "jax":  # imports JAX in the shard actors only
            from expertmesh.actors.jax_context_shard import RemoteJaxContextShard as shard_cls
        shards = [
            shard_cls.options(**actor_options(CONTEXT_SHARD), name=None).remote(
                i, specs, shard_capacity_tokens, page_size, threads, store, shard_memory_bytes, kv_dtype)
            for i in range(context_shards)
        ]
        groups = [
            RemoteExpertGroup.options(**actor_options(EXPERT_GROUP)).remote(
                str(path), g, experts, threads, expert_backend)
            for g, experts in enumerate(partition)
        ]
        named = {"name": f"{name}.router", "namespace": NAMESPACE} if name else {}
        router = RemoteRouter.options(**actor_options(None), **named).remote(
            str(path), shards, groups, shard_capacity_tokens, threads, max_batch_tokens, lanes, compiled_graphs,
            store, kv_dtype, page_size, fingerprint)
        try:
            ray.get([router.ping.remote(), *(a.ping.remote() for a in shards + groups)])
        except ray.exceptions.RayActorError as exc:  # e.g. JAX missing on a shard host: say so
            for a in [router, *shards, *groups]:
                ray.kill(a)
            if "expertmesh[jax]" in str(exc):
                line = next(x for x in str(exc).splitlines() if "expertmesh[jax]" in x)
                raise ImportError(line.split("ImportError: ", 1)[-1].strip()) from None
            raise
        return cls(router, shards, groups, config, load_tokenizer(path, config.vocab_size), path, started)

    @classmethod
    def attach(cls, name: str) -> "Mesh":
        """A handle on a running mesh started with `Mesh.start(name=...)` (Ray must be initialised)."""
        try:
            router = ray.get_actor(f"{name}.router", namespace=NAMESPACE)
        except ValueError:
            raise ValueError(f"no running mesh named {name!r} in this Ray cluster (start one with "
                             f"Mesh.start(name={name!r}) or `expertmesh serve`)") from None
        desc = ray.get(router.describe.remote())
        path = resolve_checkpoint(desc["checkpoint"])
        config = ModelConfig.from_file(path / "config.json")
        return cls(router, desc["shards"], desc["groups"], config, load_tokenizer(path, config.vocab_size), path,
                   started_ray=False, owned=False)

    # -- contexts -------------------------------------------------------------------------
    @_unwrap
    def register_context(self, token_ids: list[int], mode: str = "exact", shards: int | None = None,
                         owner: str = "default", visibility: str = "private", name: str | None = None) -> ContextInfo:
        """Register a context once; its KV is kept sharded over the context shards."""
        return ray.get(self.router.register_context.remote(self._ids(token_ids, "context"), mode, shards, None,
                                                           owner, visibility, name))

    @_unwrap
    def drop_context(self, context_id: str) -> None:
        ray.get(self.router.drop_context.remote(context_id))

    @_unwrap
    def contexts(self) -> list[ContextInfo]:
        return ray.get(self.router.list_contexts.remote())

    # -- requests -------------------------------------------------------------------------
    @_unwrap
    def forward_logits(self, prompt_ids: list[int], context_id: str | None = None,
                       top_shards: int | None = None, top_pages: int | None = None) -> np.ndarray:
        """Logits [len(prompt_ids), vocab] as if context + prompt were one sequence."""
        return ray.get(self.router.forward_logits.remote(self._ids(prompt_ids, "prompt").tolist(), context_id,
                                                         top_shards, top_pages))

    @_unwrap
    def generate(self, prompt_ids: list[int], context_id: str | None = None, max_new_tokens: int = 32,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 top_shards: int | None = None, stop_token_ids: tuple[int, ...] = (),
                 top_pages: int | None = None) -> GenerationResult:
        """Generate after context + prompt; safe to call from many threads (requests batch).

        top_shards=k: the k shards whose page summaries bound q.k highest (global layers);
        top_pages=p: in each shard, only the p best-bounded pages (Quest). None: exact."""
        res = ray.get(self.router.generate.remote(
            self._ids(prompt_ids, "prompt").tolist(), context_id, max_new_tokens, temperature, top_p, seed,
            top_shards, tuple(stop_token_ids), "default", None, top_pages))
        return GenerationResult(
            request_id=res["request_id"], token_ids=res["token_ids"], text=self.tokenizer.decode(res["token_ids"]), pathway=res["pathway"],
            finish_reason=res["finish_reason"], prompt_tokens=res["prompt_tokens"],
            completion_tokens=res["completion_tokens"], context_tokens=res["context_tokens"],
            ttft_s=res["ttft_s"], total_s=res["total_s"])

    def stats(self) -> dict:
        return {
            "router": ray.get(self.router.stats.remote()),
            "shards": ray.get([s.stats.remote() for s in self.shards]),
            "expert_groups": ray.get([g.stats.remote() for g in self.groups]),
        }

    def shutdown(self) -> None:
        """Stop this mesh's actors (and Ray, if this mesh started it); an attached handle only lets go."""
        if not self._owned:
            return
        try:  # compiled graphs first: killing their actors under them hangs for 30 s
            ray.get(self.router.close.remote(), timeout=60)
        except Exception:  # noqa: BLE001 - a dead router has no graphs left to tear down
            pass
        for actor in [self.router, *self.shards, *self.groups]:
            ray.kill(actor)
        if self._started_ray:
            ray.shutdown()

    def _ids(self, ids, what: str) -> np.ndarray:
        arr = np.asarray(ids).reshape(-1)
        if arr.size == 0:
            raise ValueError(f"the {what} is empty; at least 1 token is needed")
        if arr.dtype.kind not in "iu":
            raise ValueError(f"{what} token ids must be integers, got {arr.dtype}")
        bad = (arr < 0) | (arr >= self.config.vocab_size)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{what} token id {int(arr[i])} at index {i} is outside the vocabulary "
                             f"[0, {self.config.vocab_size})")
        return arr.astype(np.int64)

    def __enter__(self) -> "Mesh":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

