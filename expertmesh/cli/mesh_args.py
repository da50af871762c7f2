"""The flags that describe a mesh (shared by generate, serve, demo, eval) and what they build."""

from __future__ import annotations

import argparse


def mesh_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="Hugging Face model directory or URI (default: built-in model)")
    p.add_argument("--context-shards", type=int, default=None,
                   help="context shard actors (default: picked from the hardware, see --colocate)")
    p.add_argument("--expert-groups", type=int, default=None,
                   help="expert group actors (default: picked from the hardware, see --colocate)")
    p.add_argument("--address", default=None, help="Ray address to join ('auto' or URL); default: start locally")
    p.add_argument("--store", default=None, help="context store: directory or URI (s3://, gs://, file://); "
                                                 "contexts survive restarts")
    p.add_argument("--shard-memory-bytes", type=int, default=None,
                   help="hot KV pages per shard in memory (default: 1/8 of host memory; on a GPU, 90%% of "
                        "the free part of the shard's GPU share)")
    p.add_argument("--kv-dtype", choices=("float32", "bfloat16"), default="float32", help="how KV pages are stored")
    p.add_argument("--shard-backend", choices=("torch", "jax"), default="torch",
                   help="what context shards compute with (jax: pip install 'expertmesh[jax]')")
    p.add_argument("--expert-backend", choices=("torch", "jax"), default="torch",
                   help="what expert groups compute with (jax: pip install 'expertmesh[jax]')")
    p.add_argument("--device", default="auto", type=_device,
                   help="where weights and KV live: auto (a GPU where the actor sees one), cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weights and activations (auto: bfloat16 on CUDA, float32 on CPU); softmax "
                        "statistics and the merge of partial attention stay float32")
    p.add_argument("--colocate", action=argparse.BooleanOptionalAction, default=None,
                   help="one context shard and one expert group per actor (per accelerator). Default: with "
                        "no counts given, one colocated worker per GPU, or per 4 CPUs on CPU hosts; with "
                        "counts, separate actors")
    p.add_argument("--data-plane", choices=("collective", "ray"), default="collective",
                   help="per-layer tensors over torch.distributed collectives (NCCL/gloo) or Ray calls")
    p.add_argument("--routers", type=int, default=1,
                   help="router actors: requests spread over them, one that dies fails over (default 1)")
    p.add_argument("--micro-batches", type=int, choices=(1, 2), default=1,
                   help="2: a router step runs its requests as two halves in ping-pong, one computing while the "
                        "other's rows are at the shards and expert groups (same logits; default 1)")
    p.add_argument("--whole-steps", action=argparse.BooleanOptionalAction, default=True,
                   help="where one colocated worker holds every shard and expert group, send it each step whole "
                        "(one round trip a step; same logits; default on)")


def _device(value: str) -> str:
    from expertmesh.model.device import check_device_dtype

    try:
        return check_device_dtype(value, "auto")[0]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


PLACEMENT = ("device", "dtype", "colocate", "data_plane", "routers", "micro_batches", "whole_steps")


def spec_of(args: argparse.Namespace, **more):
    """The MeshSpec the flags describe (validated: a bad value fails before anything starts)."""
    from expertmesh.mesh_spec import MeshSpec

    return MeshSpec(checkpoint=args.checkpoint, context_shards=args.context_shards, expert_groups=args.expert_groups,
                    **mesh_kwargs(args), **more)


def mesh_kwargs(args: argparse.Namespace) -> dict:
    """The store, backend and placement settings of a mesh (Mesh.start / ServeSettings keywords)."""
    placement = {k: getattr(args, k) for k in PLACEMENT}
    return {"store": args.store, "shard_memory_bytes": args.shard_memory_bytes, "kv_dtype": args.kv_dtype,
            "shard_backend": args.shard_backend, "expert_backend": args.expert_backend, **placement}
