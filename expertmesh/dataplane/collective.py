"""The collective data plane: no Ray task per step or per layer; every per-step and per-layer
message travels point to point between the router and an actor: over a torch.distributed NCCL
group when the router computes on a GPU, over TCP sockets on CPU hosts (socket_group.py, the
same send/recv surface; a torch.distributed gloo group is the other CPU choice, `transport`).

Ray places the actors and carries control: forming the group (`join_group`, which starts each
actor's step loop, step_worker.py) and everything outside steps (registration writes, stats).
Each step, the router sends every participating actor its slice of the plan (`PeerPlan`:
int64 length, then the plan in wire.py's data-only encoding) just before the first message of the step that actor
gets; then both sides walk the plan in order and exchange point-to-point messages (rank 0 is
the router; the messages' layouts are in wire.py; the router's side of a step is collective_step.py).

Membership: only the mesh's actors join a group (a new key per generation, handed out through
Ray; the socket transport's handshake.py; gloo/NCCL meet through Ray, rendezvous.py). Nothing
received is unpickled; plan and error lengths are checked before anything is allocated.

Failure: an actor whose work fails answers with status 1 followed by its error as (kind,
message) (wire.py), and goes back to waiting for the next plan; the router finishes the phase, then sends every actor
still in the step an abort where it waits next (flag or count -1), and raises the actor's error.
A transport error (an actor died: its connections close at once; or an operation ran past
STEP_TIMEOUT) drops the group: the step fails with DataPlaneError, which the router retries once,
forming a new group that the restarted actor joins (a dead one ends the formation: join_watch.py).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import threading
import time
from typing import Any

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from expertmesh.dataplane.calls import ActorExchange
from expertmesh.dataplane.collective_step import CollectiveStep, start_step
from expertmesh.dataplane.collective_whole import incarnation, run_whole, whole_rank
from expertmesh.dataplane.handshake import new_key
from expertmesh.dataplane.join_watch import join_check
from expertmesh.dataplane.liveness import RECHECK_S, LeftOut
from expertmesh.dataplane.plane_metrics import DataPlaneMetrics
from expertmesh.dataplane.rendezvous import RendezvousStore
from expertmesh.dataplane.socket_group import Listener, SocketGroup
from expertmesh.dataplane.step_watch import watch_exchange
from expertmesh.dataplane.transport import (
    GROUP_TIMEOUT,
    backend_for,
    make_group,
    peer_list,
)
from expertmesh.dataplane.wire import WireLimits
from expertmesh.engine.exchange import STEP_TIMEOUT_S
from expertmesh.engine.step_plan import StepPlan
from expertmesh.errors import Unavailable

JOIN_TIMEOUT_S = 60.0  # forming a group waits this long for every actor (a restarting one too)
STOP = -2  # a plan length that ends an actor's step loop
SPIN_S = 0.0005  # how long the router polls for a reply before it sleeps, where it has a core to poll on
log = logging.getLogger("expertmesh.dataplane")


class StepAborted(RuntimeError):
    """The router ended the step early (another actor or the router itself failed)."""


class CollectiveExchange(ActorExchange):
    """The router's side (rank 0). One step at a time: a lock spans begin .. end/abort."""

    def __init__(self, shards: list[Any], groups: list[Any], heads: int, head_dim: int, hidden: int,
                 num_layers: int, device: torch.device = torch.device("cpu"), join_timeout_s: float = JOIN_TIMEOUT_S,
                 transport: str = "auto", router: str = "", routers: int = 0) -> None:
        """routers: the mesh's (each may run on this host): this router polls for replies (socket
        transport) where its host's cores number at least them + the actors on it; 0: it never polls."""
        self.peers, self.router = peer_list(shards, groups), router  # router: which of the mesh's routers this is
        self.routers = routers
        self.ranks: dict[int, int] = {}  # peer index -> its rank in the current generation (members only)
        self.rank_of_shard: dict[int, int] = {}
        self.rank_of_group: dict[int, int] = {}
        self.left_shards: dict[int, str] = {}  # context shard -> Ray's state of its actor, left out of this generation
        self.left_groups: dict[int, str] = {}  # expert group -> likewise
        self._checked = 0.0  # when the left-out actors were last asked about
        self._out = LeftOut()  # peers left out of the group
        self.heads, self.head_dim, self.hidden, self.device = heads, head_dim, hidden, device
        self.limits = WireLimits(heads, head_dim, hidden, num_layers, len(shards))  # what actors check plans against
        self.backend, self.join_timeout_s = backend_for(device, transport), join_timeout_s
        self.pack = self.backend != "socket"  # a message costs little on a socket: no padded packing
        self._zero = torch.zeros(1, dtype=torch.int64, device=device)  # a group without rows at a layer
        self.generation, self.groups_formed, self.steps = 0, 0, 0
        self.refused = 0  # data-plane connections refused (failed or stalled handshakes)
        self.malformed = 0  # connections ended for a malformed message from an actor
        self._metrics: DataPlaneMetrics | None = None
        self.formation_s = 0.0  # how long the last group formation took
        self._pg = None
        self._rendezvous = None  # the gloo/NCCL transports' RendezvousStore actor
        self._store = None  # this process's client of it
        self._listener = None  # the socket transport's listening socket
        self._lock = threading.Lock()
        self._held: dict[int, list[torch.Tensor]] = {}  # rank -> messages to go out with its next one (any step)
        self.member_nodes: dict[int, str] = {}  # rank -> the Ray node its actor runs on (current group)
        self.step_started: float | None = None  # time.monotonic() the current step began (None between steps)
        self.incarnation = incarnation()  # whole steps' mirrors at the worker belong to this exchange
        self.watch = watch_exchange(self)  # a member whose host Ray declared dead is cut (step_watch.py)

    @property
    def address(self) -> tuple:  # where actors connect (socket transport): (host, port, unix name)
        return tuple(self._listener.address) if self._listener is not None else ()

    # -- the group --------------------------------------------------------------------------
    def _form_group(self) -> None:
        """A new generation of the group with a new key, handed to the actors through Ray:
        every actor Ray reports alive joins; one it does not (or no longer, while the group
        forms) is left out (`absent()`, join_watch.py); fails within join_timeout_s."""
        self.generation += 1
        self._held = {}  # nothing carries over to a new group
        started = time.perf_counter()
        key = new_key() if self.backend == "socket" else b""
        if self.backend == "socket":
            if self._listener is None:
                self._listener = Listener(ray.util.get_node_ip_address())
            address = self._listener.address
        else:
            if self._rendezvous is None:
                node = ray.get_runtime_context().get_node_id()
                self._rendezvous = RendezvousStore.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                    node, soft=True)).remote()
            else:
                self._rendezvous.forget.remote(f"expertmesh/g{self.generation - 1}/")
            address = self._rendezvous
        left = self._out.refresh([h for h, _, _ in self.peers])
        self._set_members([i for i in range(len(self.peers)) if i not in left], left)
        world = len(self.ranks) + 1
        refs = {r: self.peers[i][0].join_group.remote(address, self.generation, r, world, self.backend,
                                                      self.join_timeout_s, key, self.limits, self.router)
                for i, r in self.ranks.items()}
        try:
            if self.backend == "socket":
                self._pg = SocketGroup.accept(self._listener, key, self.generation, world, self.join_timeout_s,
                                              GROUP_TIMEOUT, STEP_TIMEOUT_S,
                                              join_check(refs, {r: self.peers[i] for i, r in self.ranks.items()}))
                self.refused += self._pg.refused
                if self.routers and len(self._pg.local) + self.routers <= host_cores():
                    self._pg.spin_s = SPIN_S  # a core for every process of the mesh here: poll for replies
                if self._pg.left_out:  # shards Ray stopped reporting alive while the group formed
                    for rank in self._pg.left_out:  # a queued join would run for nothing when the actor is back
                        try:
                            ray.cancel(refs.pop(rank))
                        except Exception:  # noqa: BLE001 - it ran, or cannot be cancelled: it fails on its own
                            pass
                    out = {i for i, r in self.ranks.items() if r in self._pg.left_out}
                    for i in out:
                        self._out.add(i, self.peers[i][0])
                    self._set_members([i for i in self.ranks if i not in out], self._out.why(), renumber=False)
            else:
                self._pg, self._store = make_group(self.backend, address, self.generation, 0, world,
                                                   self.join_timeout_s)
            nodes = ray.get(list(refs.values()), timeout=self.join_timeout_s)
            self.member_nodes = dict(zip(refs, nodes))
        except Exception as exc:  # noqa: BLE001 - an actor that cannot join: the mesh is unavailable now
            if self._pg is not None:
                self._pg.abort()
            self._pg = None
            if isinstance(exc, ray.exceptions.RayActorError) and self.backend != "socket":
                self._rendezvous = None  # its actor may be the one that died
            raise Unavailable(f"the mesh's actors did not form their process group within {self.join_timeout_s:g} s "
                              f"({type(exc).__name__}: {str(exc)[:300]}); retry later") from None
        self.groups_formed += 1
        self.formation_s = time.perf_counter() - started
        self._checked = time.monotonic()
        self._count(formed=True)

    def _set_members(self, members: list[int], left: dict[int, str], renumber: bool = True) -> None:
        if renumber:
            self.ranks = {i: r for r, i in enumerate(members, start=1)}
        else:
            self.ranks = {i: self.ranks[i] for i in members}
        self.rank_of_shard = {self.peers[i][1]: r for i, r in self.ranks.items() if self.peers[i][1] is not None}
        self.rank_of_group = {self.peers[i][2]: r for i, r in self.ranks.items() if self.peers[i][2] is not None}
        self.left_shards = {self.peers[i][1]: st for i, st in left.items() if self.peers[i][1] is not None}
        self.left_groups = {self.peers[i][2]: st for i, st in left.items() if self.peers[i][2] is not None}

    def add_shards(self, handles: list[Any], first: int) -> None:
        """Context shards added to the mesh: the next step forms a new generation with them."""
        with self._lock:
            self.peers += [(h, first + k, None) for k, h in enumerate(handles)]
            self.limits = dataclasses.replace(self.limits, shards=max(self.limits.shards, first + len(handles)))
            self._drop_group()

    def add_groups(self, handles: dict[int, Any]) -> None:
        """Expert groups added to the mesh: the next step forms a new generation with them."""
        with self._lock:
            self.peers += [(h, None, g) for g, h in handles.items()]
            self._drop_group()

    def remove_groups(self, groups: set[int]) -> None:
        """Expert groups taken out of the mesh: the next generation forms without them (an actor
        that is also a context shard stays, as a shard)."""
        self._leave([(h, s, None if g in groups else g) for h, s, g in self.peers])

    def remove_shards(self, shards: set[int]) -> None:
        """Context shards taken out of the mesh: the next generation forms without them."""
        self._leave([(h, None if s in shards else s, g) for h, s, g in self.peers])

    def _leave(self, peers: list) -> None:
        with self._lock:
            self.peers = [p for p in peers if p[1] is not None or p[2] is not None]
            self._out = LeftOut()  # by peer index: asked again as the next generation forms
            self._drop_group()

    def stats(self) -> dict:
        return {"process_groups_formed": self.groups_formed, "transport": self.backend, "generation": self.generation,
                "data_plane_refused": self.refused, "data_plane_malformed": self.malformed,
                "members_cut": self.watch.cuts, "group_formation_seconds": self.formation_s,
                "data_plane_address": list(self.address)}

    def allow_segments(self, n: int) -> None:
        """Plans may name n shards' segments (contexts stored by a mesh with more shards, served by
        this mesh's): the actors' bound on a step's attention rows grows, from the next group."""
        with self._lock:
            if n > self.limits.shards:
                self.limits = dataclasses.replace(self.limits, shards=n)
                self._drop_group()

    def shard_handle(self, shard: int) -> Any:
        return next(h for h, s, _ in self.peers if s == shard)

    def group_handle(self, group: int) -> Any:
        return next(h for h, _, g in self.peers if g == group)

    def absent(self, fresh: bool = False) -> tuple[dict[int, str], dict[int, str]]:
        """Form the group if there is none; the context shards and expert groups left out of it
        (index -> Ray's state of its actor). While any is left out, at most every RECHECK_S (or now,
        fresh): one Ray reports alive again ends this generation, and the next one takes it back in."""
        with self._lock:
            if self._pg is not None and len(self.ranks) < len(self.peers) and \
                    (fresh or time.monotonic() - self._checked >= RECHECK_S):
                self._checked = time.monotonic()
                if self._out.any_back([h for h, _, _ in self.peers]):
                    self._drop_group()
            if self._pg is None:
                self._form_group()
            return dict(self.left_shards), dict(self.left_groups)

    def refresh_metrics(self) -> None:
        if self._metrics is not None and self._metrics.stale():  # (from the first group on)
            self._count()

    def _count(self, formed: bool = False) -> None:
        """Ray metrics beside the counts in the router's stats."""
        self._metrics = self._metrics or DataPlaneMetrics(self.router)
        self._metrics.record(self.backend, formed, self.refused, self.malformed)

    def _drop_group(self) -> None:
        """End the actors' step loops (those that can still hear) and leave the group."""
        if self._pg is None:
            return
        stop = torch.tensor([STOP], dtype=torch.int64, device=self.device)
        held, self._held = self._held, {}
        for rank in self.ranks.values():
            try:
                for t in [*held.get(rank, []), stop]:  # what it still has to hear first
                    self._pg.send([t], rank, 0).wait(datetime.timedelta(seconds=2))
            except Exception:  # noqa: BLE001 - a dead actor: its loop is gone with it
                pass
        try:
            self._pg.abort()
        except Exception:  # noqa: BLE001 - already broken
            pass
        self._pg = None

    # -- a step -----------------------------------------------------------------------------
    def begin(self, plan: StepPlan) -> CollectiveStep:
        """The step's exchange (one step at a time: the lock spans begin .. end/abort)."""
        return self.begin_micro([plan])[0]

    def begin_micro(self, plans: list[StepPlan]) -> list[CollectiveStep]:
        """One step of micro-batches (ping_pong.py): each actor's slices of the plans, interleaved."""
        self._lock.acquire()
        try:
            if self._pg is None:
                self._form_group()
            if self._metrics is None or self._metrics.stale():  # keep the gauges live while serving
                self._count()
            self.step_started = time.monotonic()
            views = start_step(self, plans)
        except BaseException:
            self.step_started = None
            self._lock.release()
            raise
        self.steps += 1
        return views

    def whole_target(self) -> bool:
        self.absent()  # (forms the group)
        return whole_rank(self) is not None

    def whole(self, request, vocab: int, experts: int, groups: int):
        return run_whole(self, dataclasses.replace(request, incarnation=self.incarnation), vocab, experts, groups)

    def close(self) -> None:
        """Leave the group: after the step in flight, if any (bounded by the step timeout)."""
        self.watch.close()
        locked = self._lock.acquire(timeout=STEP_TIMEOUT_S)
        try:
            self._drop_group()
        finally:
            if locked:
                self._lock.release()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._rendezvous is not None:
            ray.kill(self._rendezvous)
            self._rendezvous = None


def host_cores() -> int:
    """The cores this process may use: its CPU affinity, within its cgroup's CPU quota (a container's limit)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores
