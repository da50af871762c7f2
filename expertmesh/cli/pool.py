"""`expertmesh pool`: an operator's hand on a running mesh's context pool (e.g. from the head
pod of a KubeRay cluster: `kubectl exec ... -- expertmesh pool add-shards 1`).

    expertmesh pool status                 # each shard: Ray's state of it, tokens it holds
    expertmesh pool add-shards N           # N more context shards, like the running ones
    expertmesh pool rebalance              # move stored segments onto the least loaded shards

Each prints JSON. `--mesh` names the mesh (`ServeSettings.mesh_name`, default "expertmesh").
"""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser("pool", help="a running mesh's context pool: status, add-shards N, rebalance")
    p.add_argument("action", choices=("status", "add-shards", "rebalance"))
    p.add_argument("count", nargs="?", type=int, default=1, help="add-shards: how many (default 1)")
    p.add_argument("--mesh", default="expertmesh", help="the running mesh's name (default: expertmesh)")
    p.add_argument("--address", default="auto", help="Ray address of its cluster (default: auto)")
    p.add_argument("--timeout-s", type=float, default=120.0, help="add-shards: bound on starting them")
    p.set_defaults(func=cmd_pool)


def cmd_pool(args: argparse.Namespace) -> int:
    import ray

    from expertmesh.platform.mesh import Mesh

    if not ray.is_initialized():
        ray.init(address=args.address, log_to_driver=False)
    mesh = Mesh.attach(args.mesh)
    if args.action == "add-shards":
        from expertmesh.platform.more_shards import is_detached

        if not is_detached(mesh.router):
            raise ValueError(f"mesh {args.mesh!r} was started by a driver, not detached: shards added from this "
                             "command would end with it; call mesh.add_shards(n) in that driver (meshes of "
                             "`expertmesh serve` and the Helm chart are detached)")
        out = {"added": mesh.add_shards(args.count, timeout_s=args.timeout_s)}
    elif args.action == "rebalance":
        out = mesh.rebalance()
    else:
        out = mesh.pool()
    print(json.dumps(out, indent=1))
    return 0
