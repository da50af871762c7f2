"""`expertmesh pool`: an operator's hand on a running mesh's context pool (e.g. from the head
pod of a KubeRay cluster: `kubectl exec ... -- expertmesh pool add-shards 1`).

    expertmesh pool status                 # each shard: Ray's state of it, tokens it holds
    expertmesh pool add-shards N           # N more context shards, like the running ones
    expertmesh pool rebalance              # move stored segments onto the least loaded shards
    expertmesh pool remove-shards S [S ...]   # take shards out (their segments move first)
    expertmesh pool experts                # expert groups, the placement in force, load per layer
    expertmesh pool balance-experts [--redundant R]   # re-place experts by the counted load
    expertmesh pool add-groups N [--redundant R]      # N more expert groups, experts balanced onto them
    expertmesh pool remove-groups G [G ...]           # take groups out (their experts move first)

Each prints JSON. `--mesh` names the mesh (`ServeSettings.mesh_name`, default "expertmesh").
"""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser("pool", help="a running mesh's context pool and expert groups: status, add-shards N, "
                                    "rebalance, remove-shards S..., experts, balance-experts, add-groups N, "
                                    "remove-groups G...")
    p.add_argument("action", choices=("status", "add-shards", "rebalance", "remove-shards", "experts",
                                      "balance-experts", "add-groups", "remove-groups"))
    p.add_argument("numbers", nargs="*", type=int,
                   help="add-shards / add-groups: how many (default 1); remove-shards / remove-groups: indices")
    p.add_argument("--redundant", type=int, default=0,
                   help="balance-experts / add-groups / remove-groups: extra copies of hot experts per MoE layer")
    p.add_argument("--mesh", default="expertmesh", help="the running mesh's name (default: expertmesh)")
    p.add_argument("--address", default="auto", help="Ray address of its cluster (default: auto)")
    p.add_argument("--timeout-s", type=float, default=120.0, help="bound on starting actors, moving experts")
    p.set_defaults(func=cmd_pool)


def cmd_pool(args: argparse.Namespace) -> int:
    import ray

    from expertmesh.platform.mesh import Mesh

    if not ray.is_initialized():
        ray.init(address=args.address, log_to_driver=False)
    mesh = Mesh.attach(args.mesh)
    count = args.numbers[0] if args.numbers else 1
    if args.action in ("add-shards", "add-groups"):
        from expertmesh.platform.more_shards import is_detached

        what = args.action.split("-")[1]
        if not is_detached(mesh.router):
            raise ValueError(f"mesh {args.mesh!r} was started by a driver, not detached: {what} added from this "
                             f"command would end with it; call mesh.add_{what}(n) in that driver (meshes of "
                             "`expertmesh serve` and the Helm chart are detached)")
    if args.action == "add-shards":
        out = {"added": mesh.add_shards(count, timeout_s=args.timeout_s)}
    elif args.action == "add-groups":
        out = mesh.add_groups(count, redundant=args.redundant, timeout_s=args.timeout_s)
    elif args.action in ("remove-groups", "remove-shards"):
        if not args.numbers:
            raise ValueError(f"{args.action} needs the indices of what to take out (`expertmesh pool status` lists "
                             "the shards, `expertmesh pool experts` the groups)")
        out = mesh.remove_shards(args.numbers) if args.action == "remove-shards" else \
            mesh.remove_groups(args.numbers, redundant=args.redundant, timeout_s=args.timeout_s)
    elif args.action == "balance-experts":
        out = mesh.balance_experts(redundant=args.redundant, timeout_s=args.timeout_s)
    elif args.action == "experts":
        out = mesh.experts()
    elif args.action == "rebalance":
        out = mesh.rebalance()
    else:
        out = mesh.pool()
    print(json.dumps(out, indent=1))
    return 0
