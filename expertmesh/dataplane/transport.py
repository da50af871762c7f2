"""The collective data plane's transports: which one a router uses, and joining a generation
of a mesh's process group (an actor's side; the router's is CollectiveExchange._form_group).
See collective.py for the wire format and socket_group.py for the socket transport."""

from __future__ import annotations

import datetime
from typing import Any

import ray
import torch
import torch.distributed as dist

from expertmesh.dataplane.rendezvous import RayStore
from expertmesh.dataplane.socket_group import SocketGroup
from expertmesh.engine.exchange import STEP_TIMEOUT_S, check_transport

GROUP_TIMEOUT = datetime.timedelta(days=1)  # an idle step loop waits this long for the next plan


def make_group(backend: str, address, generation: int, rank: int, world: int, timeout_s: float,
               key: bytes = b""):
    """This process's member of generation `generation` of a mesh's process group (an actor's,
    rank > 0, for the socket transport: the router accepts in `CollectiveExchange._form_group`).
    address: the router's `Listener.address` (socket; `key` is the generation's handshake key)
    or its `RendezvousStore` actor (gloo, NCCL: the rendezvous goes through Ray, rendezvous.py).
    Returns (group, store): the caller keeps the store (a Python store must outlive its group's use of it)."""
    if backend == "socket":
        same_host = ray.util.get_node_ip_address() == address[0]
        return SocketGroup.connect(address, key, generation, rank, timeout_s, GROUP_TIMEOUT, STEP_TIMEOUT_S,
                                   same_host), None
    store = RayStore(address, datetime.timedelta(seconds=timeout_s), prefix=f"expertmesh/g{generation}/")
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = GROUP_TIMEOUT
        return dist.ProcessGroupNCCL(store, rank, world, opts), store
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = GROUP_TIMEOUT
    # gloo's pairs listen on the node address Ray uses, not on whatever the host name resolves to
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=ray.util.get_node_ip_address())]
    return dist.ProcessGroupGloo(store, rank, world, opts), store


def backend_for(device: torch.device, transport: str = "auto") -> str:
    """NCCL when the router computes on a GPU, TCP sockets on CPU hosts (socket_group.py says
    why not gloo); or the transport named."""
    if check_transport(transport) == "auto":
        return "nccl" if device.type == "cuda" else "socket"
    if (transport == "nccl") != (device.type == "cuda"):
        raise ValueError(f"transport {transport!r} does not fit the router's device {device} "
                         f"(NCCL moves GPU tensors; 'socket' and 'gloo' host tensors)")
    return transport


def is_transport_error(exc: BaseException) -> bool:
    """An error of the group or the step's control, not of the actor's own work."""
    text = f"{type(exc).__name__} {exc}"
    return isinstance(exc, (RuntimeError, dist.DistBackendError)) and any(
        s in text for s in ("Connection closed", "Timed out", "timed out", "Connection reset", "StepAborted",
                            "StaleStep", "gloo", "NCCL"))


def peer_list(shards: list[Any], groups: list[Any]) -> list[tuple[Any, int | None, int | None]]:
    """Unique actors (handle, shard index, group index): a colocated actor holds one of each.
    A handle None: taken out of the mesh (remove_shards, remove_groups), not a peer."""
    peers: dict[Any, list] = {}
    for i, h in enumerate(shards):
        if h is not None:  # a shard taken out of the mesh
            peers.setdefault(h._actor_id, [h, None, None])[1] = i
    for g, h in enumerate(groups):
        if h is not None:  # a group taken out of the mesh
            peers.setdefault(h._actor_id, [h, None, None])[2] = g
    return [tuple(p) for p in peers.values()]
