"""`Mesh`: the driver-side handle of a running expertmesh deployment."""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from pathlib import Path
from typing import Any

import numpy as np
import ray

from expertmesh.actors.names import CONTEXT_SHARD, NAMESPACE, actor_name, lookup, routers_of
from expertmesh.dataplane.liveness import down
from expertmesh.engine.request import Request
from expertmesh.errors import PlacementError
from expertmesh.jax_backend import check_jax_installed
from expertmesh.mesh_spec import MeshSpec
from expertmesh.model.checkpoint import resolve_checkpoint
from expertmesh.model.config import ModelConfig
from expertmesh.model.default import default_checkpoint
from expertmesh.model.sampling import SamplingParams
from expertmesh.model.tokenizer import Tokenizer, load_tokenizer
from expertmesh.platform.elastic_experts import (
    balance_experts,
    remove_groups,
    start_groups,
)
from expertmesh.platform.launch import launch
from expertmesh.platform.more_shards import start_shards
from expertmesh.platform.router_set import RouterSet
from expertmesh.store.fingerprint import model_fingerprint
from expertmesh.store.location import StoreLocation
from expertmesh.store.registry import ContextInfo


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """`Mesh.generate`'s answer: the router's Result (engine/request.py) with the text decoded."""

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
    logprobs: tuple | None = None  # TokenLogprob per generated token (params.logprobs set)
    prompt_logprobs: tuple | None = None  # per prompt token, the first None (params.prompt_logprobs set)


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


class Mesh:
    """Context shards + expert groups + a router, as Ray actors."""

    def __init__(self, routers: list, shards: list, groups: list, config: ModelConfig, tokenizer: Tokenizer,
                 checkpoint: Path, started_ray: bool, owned: bool = True) -> None:
        self.routers, self.shards, self.groups = list(routers), shards, groups
        self.router = self.routers[0]  # the first (a mesh of one router: the router)
        self._set = RouterSet(self.routers)
        self.config, self.tokenizer, self.checkpoint = config, tokenizer, checkpoint
        self._started_ray, self._owned = started_ray, owned
        shard_ids = {s._actor_id for s in shards}
        self.colocated = any(g._actor_id in shard_ids for g in groups)

    @classmethod
    def start(cls, checkpoint: str | os.PathLike | None = None, spec: MeshSpec | None = None, *,
              address: str | None = None, name: str | None = None, detached: bool = False,
              start_timeout_s: float = 120.0, **fields: Any) -> "Mesh":
        """Start a mesh on a local Ray cluster (address=None) or join one ("auto" or a URL).

        The mesh is `spec` (a `MeshSpec`), or the spec made of `checkpoint` and `fields` (every
        `MeshSpec` field by name: context_shards, expert_groups, colocate, routers, store,
        shard_capacity_tokens, shard_memory_bytes, page_size, kv_dtype, max_batch_tokens, lanes, micro_batches,
        whole_steps, data_plane, transport, shard_backend, expert_backend, device, dtype, gpus_per_actor; the
        `MeshSpec` docstring says what each does), validated before anything starts.
        name: register the router under this name so other drivers and jobs can
        `Mesh.attach(name)` (e.g. an ingestion job adding contexts to a serving mesh).
        detached: the actors outlive this driver (a Serve replica's mesh outlives the replica);
        stop them with `Mesh.attach(name).shutdown(stop_actors=True)`.
        start_timeout_s: a cluster that cannot place the actors fails the start within this
        bound (PlacementError, naming the missing resources) instead of hanging; a failed start
        kills what it started.
        """
        if spec is None:
            spec = MeshSpec(checkpoint=None if checkpoint is None else str(checkpoint), **fields)
        elif checkpoint is not None or fields:
            raise ValueError("pass a MeshSpec or its fields, not both (MeshSpec.replace(...) changes one)")
        checkpoint, store = spec.checkpoint, spec.store
        path = default_checkpoint() if checkpoint is None else resolve_checkpoint(checkpoint)
        config = ModelConfig.from_file(path / "config.json")
        tokenizer = load_tokenizer(path, config.vocab_size)  # before anything starts
        fingerprint = None
        if store is not None:  # refuse a store of other weights before any actor starts
            fingerprint = model_fingerprint(path)
            StoreLocation(store).bind(fingerprint, {"architecture": config.architecture, "checkpoint": str(path)})
        if address is None and "jax" in (spec.shard_backend, spec.expert_backend):
            check_jax_installed()  # a local cluster's actors import what this process can import
        routers, shards, groups, started = launch(spec, path, config, fingerprint, address, name, detached,
                                                  start_timeout_s)
        return cls(routers, shards, groups, config, tokenizer, path, started)

    @classmethod
    def attach(cls, name: str) -> "Mesh":
        """A handle on a running mesh started with `Mesh.start(name=...)` (Ray must be initialised)."""
        routers = lookup(routers_of(name))
        if not routers:
            raise ValueError(f"no running mesh named {name!r} in this Ray cluster (start one with "
                             f"Mesh.start(name={name!r}) or `expertmesh serve`)")
        desc = RouterSet(routers).call("describe")
        path = resolve_checkpoint(desc["checkpoint"])
        config = ModelConfig.from_file(path / "config.json")
        return cls(routers, desc["shards"], desc["groups"], config, load_tokenizer(path, config.vocab_size), path,
                   started_ray=False, owned=False)

    @classmethod
    def attach_or_start(cls, name: str, start_timeout_s: float = 120.0, **start: Any) -> "Mesh":
        """The running mesh `name`, or a new detached one started under that name (Ray must be
        initialised). Serve replicas meet here: the first starts the mesh, every other one (a
        second replica, a replacement, a redeploy) attaches; replicas racing to start it leave
        one mesh. The handle returned never stops the mesh (`shutdown(stop_actors=True)` does)."""
        deadline = time.monotonic() + start_timeout_s
        try:
            return cls.attach(name)
        except ValueError:
            pass
        try:
            mesh = cls.start(name=name, detached=True, address="auto", start_timeout_s=start_timeout_s, **start)
            mesh._owned = False
            return mesh
        except ray.exceptions.ActorAlreadyExistsError:  # another replica took the name first: wait for its mesh
            pass
        while True:
            try:
                return cls.attach(name)
            except ValueError:
                if time.monotonic() > deadline:
                    raise PlacementError(f"mesh {name!r} is being started by another driver and was not up "
                                         f"within {start_timeout_s:g} s") from None
                time.sleep(0.5)

    # -- contexts -------------------------------------------------------------------------
    @_unwrap
    def register_context(self, token_ids: list[int], mode: str = "exact", shards: int | None = None,
                         owner: str = "default", visibility: str = "private", name: str | None = None,
                         router: int | None = None, progress: Callable[[dict], None] | None = None,
                         every_s: float = 0.5) -> ContextInfo:
        """Register a context once; its KV is kept sharded over the context shards. Every router
        of the mesh answers over it once this returns. router=i: through router i.
        progress(view): called about every `every_s` while it runs, and once at the end, with the
        registering router's view (tokens_done, num_tokens, tokens_per_s, eta_s, state)."""
        ids = self._ids(token_ids, "context")
        if progress is None:
            return self._call("register_context", ids, mode, shards, None, owner, visibility, name, router=router)
        cid = f"ctx-{uuid.uuid4().hex[:12]}"
        with ThreadPoolExecutor(1, thread_name_prefix="register") as pool:
            done = pool.submit(self._call, "register_context", ids, mode, shards, cid, owner, visibility, name,
                               router=router)
            while not futures_wait([done], timeout=every_s).done:
                if (view := self.registration_progress(cid)) is not None:
                    progress(view)
            info = done.result()
        progress(self.registration_progress(cid) or {"context_id": cid, "num_tokens": info.num_tokens,
                                                     "tokens_done": info.num_tokens, "state": "ready"})
        return info

    def registration_progress(self, context_id: str) -> dict | None:
        """How far a registration is, from whichever router runs it (None: none knows it)."""
        refs = [r.registration_progress.remote(context_id) for r in self.routers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=5)
        for ref in ready:
            try:
                view = ray.get(ref)
            except ray.exceptions.RayError:  # a router that died: another may know
                continue
            if view is not None:
                return view
        return None

    @_unwrap
    def drop_context(self, context_id: str, router: int | None = None) -> None:
        """Drop a context: every router of the mesh refuses it once this returns."""
        self._call("drop_context", context_id, router=router)

    @_unwrap
    def contexts(self) -> list[ContextInfo]:
        return self._call("list_contexts")

    @_unwrap
    def clean_store(self) -> dict:
        """Clean the store now (it also runs at start and every few minutes): remove what dead
        meshes' interrupted registrations left and the files of contexts dropped more than the
        grace period ago that nothing names. Safe while other meshes use the store."""
        return self._call("clean_store")

    # -- placement ------------------------------------------------------------------------
    def add_shards(self, n: int = 1, timeout_s: float = 120.0) -> list[int]:
        """Start n more context shards like the running ones (same backend, budget, store, GPU
        share; on hosts declaring `context_shard` where the cluster declares it) and add them to
        the mesh: new contexts use them at once; `rebalance()` moves existing segments onto them.
        They stay part of the mesh through router restarts. Returns their indices."""
        first = self._call("describe")["shard_slots"]
        new = start_shards(self.router, self.shards, n, timeout_s, first)
        try:
            names = [name for name, _ in new]
            added = ray.get([r.add_shards.remote(names) for r in self.routers if not down(r)])[0]
        except BaseException:
            for _, actor in new:  # a failed add leaves nothing behind
                ray.kill(actor)
            raise
        self.shards = [*self.shards, *(actor for _, actor in new)]
        return added

    # -- expert groups --------------------------------------------------------------------
    @_unwrap
    def balance_experts(self, redundant: int = 0, timeout_s: float = 120.0) -> dict:
        """Re-place experts over the running expert groups by the load the routers counted
        (tokens per expert, per MoE layer), while serving: the hottest experts get `redundant`
        extra copies per layer, and every layer's copies are spread so that each group computes
        about as many rows (DeepSeek's EPLB). Returns the balancedness (max / mean group load)
        per layer before and as planned, and what moved. Logits do not change."""
        return balance_experts(self.routers, self._moe_layers, redundant, timeout_s)

    @_unwrap
    def add_groups(self, n: int = 1, redundant: int = 0, timeout_s: float = 120.0) -> dict:
        """Start n expert groups like the running ones (on hosts declaring `expert_group` where the
        cluster declares it), add them to the mesh and balance experts onto them, while serving."""
        new, report = start_groups(self.routers, self._moe_layers, n, redundant, timeout_s)
        self.groups = [*self.groups, *new]
        return report

    @_unwrap
    def remove_groups(self, groups: list[int], redundant: int = 0, timeout_s: float = 120.0) -> dict:
        """Take expert groups out of the mesh while serving: their experts are placed on the others
        first (loaded there), every router stops sending them rows, then their actors stop."""
        handles = ray.get(self.router.expert_groups.remote(), timeout=timeout_s)["handles"]
        report = remove_groups(self.routers, self._moe_layers, list(groups), redundant, self.colocated, timeout_s)
        gone = {handles[g]._actor_id for g in groups}
        self.groups = [g for g in self.groups if g._actor_id not in gone]
        return report

    @_unwrap
    def experts(self) -> dict:
        """The expert groups (index, own experts, taken out or not), the placement in force (per
        MoE layer, the groups computing each expert) and the load the routers counted (rows per
        group per layer, balancedness per layer)."""
        info = self._call("expert_groups")
        placement, load = info.pop("placement"), self._call("stats")["expert_load"]
        info.pop("handles")
        return info | {"placement": {layer: [list(gs) for gs in experts] for layer, experts in
                                     placement.layers.items()} if placement is not None else None,
                       "load": {k: load[k] for k in ("groups", "balancedness", "max_balancedness")}}

    @property
    def _moe_layers(self) -> list[int]:
        return [i for i, moe in enumerate(self.config.moe_layers) if moe]

    @_unwrap
    def remove_shards(self, shards: list[int], timeout_s: float = 300.0) -> dict:
        """Take context shards out of the mesh while serving: their segments move to the other
        shards first (stored ones opened there from the store, the others carried peer to peer),
        requests keep running with the same logits, then every router forgets them and their
        actors stop. Returns what moved and the tokens per shard after."""
        if self.colocated:
            raise ValueError("the mesh's context shards are colocated workers that also hold expert groups; "
                             "they cannot be taken out on their own")
        report = self._call("remove_shards", list(shards))
        mesh = self._call("describe")["mesh"]
        leaving = [ray.get_actor(actor_name(mesh, CONTEXT_SHARD, s), namespace=NAMESPACE) for s in shards]
        ray.get([r.forget_shards.remote(list(shards)) for r in self.routers if not down(r)], timeout=timeout_s)
        for actor in leaving:
            ray.kill(actor)
        gone = {a._actor_id for a in leaving}
        self.shards = [h for h in self.shards if h._actor_id not in gone]
        return report

    @_unwrap
    def pool(self) -> dict:
        """Each context shard: Ray's state of its actor ("ALIVE", "RESTARTING", ...) and its tokens."""
        return self._call("pool")

    @_unwrap
    def rebalance(self) -> dict:
        """Move stored contexts' segments off shards Ray does not report alive and onto the least
        loaded running shards (after `add_shards`, or a shard host lost for good); requests keep
        running and logits stay bit-equal. Returns what moved, tokens per shard before and after,
        and the seconds it took. Contexts without a store are not moved (they live in their
        shard's memory)."""
        return self._call("rebalance")

    # -- requests -------------------------------------------------------------------------
    @_unwrap
    def forward_logits(self, prompt_ids: list[int], context_id: str | None = None,
                       top_shards: int | None = None, top_pages: int | None = None,
                       router: int | None = None) -> np.ndarray:
        """Logits [len(prompt_ids), vocab] as if context + prompt were one sequence."""
        request = Request(self._ids(prompt_ids, "prompt"), context_id, top_shards=top_shards,
                          top_pages=top_pages)
        return self._call("forward_logits", request, router=router)

    @_unwrap
    def generate(self, prompt_ids: list[int], context_id: str | None = None, max_new_tokens: int = 32,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 top_shards: int | None = None, stop_token_ids: tuple[int, ...] = (),
                 top_pages: int | None = None, router: int | None = None,
                 ignore_eos: bool = False, params: SamplingParams | None = None) -> GenerationResult:
        """Generate after context + prompt; safe to call from many threads (requests batch, and
        spread over the mesh's routers: the least busy; router=i pins one).

        top_shards=k: the k shards whose page summaries bound q.k highest (global layers);
        top_pages=p: in each shard, only the p best-bounded pages (Quest). None: exact.
        ignore_eos: run to max_new_tokens whatever the eos ids (stop_token_ids still stop).
        params: every sampling option at once (penalties, logit bias, min_tokens, log-probabilities:
        model/sampling.py), instead of the keywords above."""
        if params is None:
            params = SamplingParams(max_new_tokens, temperature, top_p, seed, tuple(stop_token_ids),
                                    ignore_eos=ignore_eos)
        request = Request(self._ids(prompt_ids, "prompt"), context_id, params, top_shards=top_shards,
                          top_pages=top_pages)
        res = self._call("generate", request, router=router)
        fields = {f.name: getattr(res, f.name) for f in dataclasses.fields(res)}
        return GenerationResult(**fields | {"token_ids": list(res.token_ids)}, text=self._decode(res.token_ids))

    def stats(self) -> dict:
        """The routers', each shard's and each expert group's stats ("router": the first router's);
        an actor that does not answer within 10 s (lost, restarting) is {"unavailable": why}."""
        refs = [*(r.stats.remote() for r in self.routers), *(s.stats.remote() for s in self.shards),
                *((g.group_stats if self.colocated else g.stats).remote() for g in self.groups)]
        ray.wait(refs, num_returns=len(refs), timeout=10)
        out = []
        for ref in refs:
            try:
                out.append(ray.get(ref, timeout=0.1))
            except Exception as exc:  # noqa: BLE001 - reported, not raised: the rest of the mesh serves on
                out.append({"unavailable": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"})
        r, n = len(self.routers), len(self.shards)
        return {"router": out[0], "routers": out[:r], "shards": out[r:r + n], "expert_groups": out[r + n:]}

    def shutdown(self, stop_actors: bool | None = None) -> None:
        """Stop this mesh's actors (and Ray, if this mesh started it); an attached handle only lets
        go unless stop_actors=True (e.g. `expertmesh serve` stopping the mesh its replicas share)."""
        if not (self._owned if stop_actors is None else stop_actors):
            return
        shards, groups, others = self.shards, self.groups, []
        try:  # every shard and group, those added by other drivers too; the Serve app's shared admission state
            desc = ray.get(self.router.describe.remote(), timeout=10)
            shards, groups = desc["shards"], [*self.groups, *desc["groups"]]
            if desc.get("mesh"):
                others = [ray.get_actor(f"{desc['mesh']}.tenants", namespace=NAMESPACE)]
        except Exception:  # noqa: BLE001 - a dead router: the shards this handle knows; no tenants actor
            pass
        for router in self.routers:  # the data plane first (each router's group)
            try:
                ray.get(router.close.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - a dead router has no group left to leave
                pass
        for actor in [*self.routers, *{a._actor_id: a for a in [*self.shards, *shards, *groups]}.values(), *others]:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self._started_ray:
            ray.shutdown()

    def _call(self, method: str, *args, router: int | None = None):
        """A router call: the least busy router (or `router`); one that dies under it fails over
        (router_set.py)."""
        return self._set.call(method, *args, pin=router)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if getattr(self.tokenizer, "available", True) else ""

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

