"""The collective data plane: no Ray task per step or per layer; every per-step and per-layer
message travels point to point between the router and an actor: over a torch.distributed NCCL
group when the router computes on a GPU, over TCP sockets on CPU hosts (socket_group.py, the
same send/recv surface; a torch.distributed gloo group is the other CPU choice, `transport`).

Ray places the actors and carries control: forming the group (`join_group`, which starts each
actor's step loop, step_worker.py) and everything outside steps (registration writes, stats).
Each step, the router sends every participating actor its slice of the plan (`PeerPlan`:
int64 length, then the plan in wire.py's data-only encoding) just before the first message of the step that actor
gets; then both sides walk the plan in order and exchange point-to-point messages (rank 0 is
the router; the messages' layouts are in wire.py).

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
import threading
import time
from typing import Any

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from expertmesh.actors.exchange import STEP_TIMEOUT_S, Exchange
from expertmesh.actors.handshake import new_key
from expertmesh.actors.join_watch import join_check
from expertmesh.actors.liveness import RECHECK_S, LeftOut
from expertmesh.actors.plane_metrics import DataPlaneMetrics
from expertmesh.actors.rendezvous import RendezvousStore
from expertmesh.actors.socket_group import Listener, SocketGroup
from expertmesh.actors.step_plan import StepPlan, packed_rows
from expertmesh.actors.transport import GROUP_TIMEOUT, backend_for, is_transport_error, make_group, peer_list
from expertmesh.actors.wire import MAX_ERROR_BYTES, WireError, WireLimits, decode_error, encode_plan
from expertmesh.errors import DataPlaneError, Unavailable

STEP_WAIT = datetime.timedelta(seconds=STEP_TIMEOUT_S)  # one operation of a step; past it the pair closes
JOIN_TIMEOUT_S = 60.0  # forming a group waits this long for every actor (a restarting one too)
STOP = -2  # a plan length that ends an actor's step loop
log = logging.getLogger("expertmesh.dataplane")


class StepAborted(RuntimeError):
    """The router ended the step early (another actor or the router itself failed)."""


class PeerFailed(RuntimeError):
    """An actor answered an exchange with an error (the router raises the actor's own)."""


def _cause(exc: BaseException) -> BaseException:
    return getattr(exc, "cause", None) or exc


class CollectiveExchange(Exchange):
    """The router's side (rank 0). One step at a time: a lock spans begin .. end/abort."""

    def __init__(self, shards: list[Any], groups: list[Any], heads: int, head_dim: int, hidden: int,
                 num_layers: int, device: torch.device = torch.device("cpu"), join_timeout_s: float = JOIN_TIMEOUT_S,
                 transport: str = "auto", router: str = "") -> None:
        self.peers, self.router = peer_list(shards, groups), router  # router: which of the mesh's routers this is
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
        self._errors: dict[int, BaseException] = {}  # rank -> its error in this step
        self._plan: StepPlan | None = None
        self._reads: list = []
        self._parts: dict[int, tuple] = {}  # rank -> its parts in this step
        self._sent: dict[int, int] = {}  # rank -> parts the router has started
        self._unsent: dict[int, Any] = {}  # rank -> its PeerPlan, until its first message of the step
        self._held: dict[int, list[torch.Tensor]] = {}  # rank -> messages to go out with its next one
        self._left: set[int] = set()  # ranks that left the step with an error
        self._works: list = []  # operations not waited for yet

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
            ray.get(list(refs.values()), timeout=self.join_timeout_s)
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

    def add_shards(self, handles: list[Any]) -> None:
        """Context shards added to the mesh: the next step forms a new generation with them."""
        with self._lock:
            first = 1 + max(s for _, s, _ in self.peers if s is not None)
            self.peers += [(h, first + k, None) for k, h in enumerate(handles)]
            self.limits = dataclasses.replace(self.limits, shards=first + len(handles))
            self._drop_group()

    def shard_handle(self, shard: int) -> Any:
        return next(h for h, s, _ in self.peers if s == shard)

    def group_handle(self, group: int) -> Any:
        return next(h for h, _, g in self.peers if g == group)

    def absent(self) -> tuple[dict[int, str], dict[int, str]]:
        """Form the group if there is none; the context shards and expert groups left out of it
        (index -> Ray's state of its actor). While any is left out, at most every RECHECK_S: one
        Ray reports alive again ends this generation, and the next one takes it back in."""
        with self._lock:
            if self._pg is not None and len(self.ranks) < len(self.peers) and \
                    time.monotonic() - self._checked >= RECHECK_S:
                self._checked = time.monotonic()
                if self._out.any_back([h for h, _, _ in self.peers]):
                    self._drop_group()
            if self._pg is None:
                self._form_group()
            return dict(self.left_shards), dict(self.left_groups)

    def _count(self, formed: bool = False) -> None:
        """Ray metrics beside the counts in the router's stats."""
        self._metrics = self._metrics or DataPlaneMetrics()
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
    def begin(self, plan: StepPlan) -> "CollectiveExchange":
        """Slice the plan for each participating actor (one step at a time)."""
        self._lock.acquire()
        try:
            if self._pg is None:
                self._form_group()
        except BaseException:
            self._lock.release()
            raise
        if self._metrics is None or self._metrics.stale():  # keep the gauges live while serving
            self._count()
        self._plan, self._reads, self._works, self._errors = plan, [], [], {}
        self._parts, self._sent, self._left, self._unsent = {}, {}, set(), {}
        for i, rank in self.ranks.items():
            _, shard, group = self.peers[i]
            part = plan.peer(self.generation, shard, group, self.heads, self.head_dim, self.hidden, self.pack)
            if part is not None:
                self._parts[rank], self._sent[rank], self._unsent[rank] = part.parts, 0, part
        self.steps += 1
        return self

    def _send(self, rank: int, *msgs: torch.Tensor, hold: bool = False) -> None:
        """Messages of the step to `rank`. An actor's slice of the plan travels with its first
        message of the step (an actor wakes when it has work, not at every step's start).
        hold: keep them to go out with the next message to this actor, in this step or a later
        one (a group without rows at a layer has nothing to do: it need not wake for that)."""
        tensors = self._held.pop(rank, [])
        part = self._unsent.pop(rank, None)
        if part is not None:
            data = encode_plan(part, self._plan.rows)
            tensors += [torch.tensor([len(data)], dtype=torch.int64, device=self.device),
                        torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)]
        tensors += msgs
        if hold:
            self._held[rank] = tensors
        elif self.backend == "socket":  # back to back in one write
            self._post(self._pg.send(tensors, rank, 0))
        else:
            for t in tensors:
                self._post(self._pg.send([t], rank, 0))

    def _one(self, pieces: list[torch.Tensor]) -> list[torch.Tensor]:
        """A message made of pieces: as they are on a socket (written back to back), one
        tensor for a process group."""
        return pieces if self.backend == "socket" else [torch.cat(pieces)]

    def _post(self, work) -> None:
        self._works.append(work)

    def _wait(self) -> None:
        works, self._works = self._works, []
        for w in works:
            w.wait(STEP_WAIT)

    def _failed(self, rank: int) -> None:
        """An actor answered status 1: its encoded error follows (int64 length, bytes; wire.py).
        A length out of bounds or a message that does not decode ends that connection."""
        self._left.add(rank)
        head = torch.empty(1, dtype=torch.int64, device=self.device)
        self._pg.recv([head], rank, 0).wait(STEP_WAIT)
        n = int(head[0])
        try:
            if not 0 < n <= MAX_ERROR_BYTES:
                raise WireError(f"an error of {n} bytes announced; at most {MAX_ERROR_BYTES}")
            buf = torch.empty(n, dtype=torch.uint8, device=self.device)
            self._pg.recv([buf], rank, 0).wait(STEP_WAIT)
            self._errors[rank] = decode_error(buf.cpu().numpy().tobytes(), rank)
        except WireError as exc:
            log.error("data plane: rank %d sent a malformed error message (%s); closing its connection", rank, exc)
            self.malformed += 1
            self._count()
            close_peer = getattr(self._pg, "close_peer", None)  # a process group cannot close one pair
            close_peer(rank) if close_peer is not None else self._pg.abort()
            raise RuntimeError(f"Connection closed: rank {rank} sent a malformed message ({exc})") from None

    def attend(self, layer, requests):
        hq_d, width = self.heads * self.head_dim, self.heads * (self.head_dim + 1)
        pending = []
        for shard, items in self._plan.layers[layer].attend.items():
            active = dict(requests.get(shard, []))
            flags = torch.tensor([1.0 if j in active else 0.0 for j in range(len(items))], device=self.device)
            pieces, got = [flags], 0
            for j, it in enumerate(items):
                if j in active:
                    pieces.append(active[j].reshape(-1).float().to(self.device))
                    got += len(it.rows)
                else:
                    pieces.append(torch.zeros(len(it.rows) * hq_d, dtype=torch.float32, device=self.device))
            rank = self.rank_of_shard[shard]
            self._sent[rank] += 1
            self._send(rank, *self._one(pieces))
            order = [j for j in range(len(items)) if j in active]
            reply = torch.empty(1 + got * width + 3 * len(order), dtype=torch.float32, device=self.device)
            if got:
                self._post(self._pg.recv([reply], rank, 0))
            pending.append((shard, rank, order, got, reply))

        def wait():
            self._wait()
            out = {}
            for shard, rank, order, got, reply in pending:
                if got and reply[0].item() != 0:
                    self._failed(rank)
                    continue
                parts, at = [], 1
                reads = reply[1 + got * width:].view(-1, 3).tolist()
                for j, (pages, memory, store) in zip(order, reads):
                    t = len(self._plan.layers[layer].attend[shard][j].rows)
                    o = reply[at:at + t * hq_d].view(t, self.heads, self.head_dim)
                    parts.append((o, reply[at + t * hq_d:at + t * width].view(t, self.heads)))
                    self._reads.append((layer, shard, j, {"pages": int(pages), "memory": int(memory),
                                                          "store": int(store)}))
                    at += t * width
                out[shard] = parts
            if self._left:
                raise PeerFailed(f"context shard(s) at ranks {sorted(self._left)} failed at layer {layer}")
            return out
        return wait

    def experts(self, layer, requests):
        pending = []
        packed = packed_rows(self._plan.layers[layer].pairs, self.hidden) if self.pack else 0
        for g in self._plan.groups:
            rows, ids = requests.get(g, (None, None))
            n = 0 if rows is None else rows.shape[0]
            rank = self.rank_of_group[g]
            self._sent[rank] += 1
            if packed:  # count, rows and expert ids in one fp32 message
                msg = torch.zeros(1 + packed * (self.hidden + 1), dtype=torch.float32, device=self.device)
                msg[0] = n
                if n:
                    msg[1:1 + n * (self.hidden + 1)] = torch.cat([rows.float(), ids.to(torch.float32)[:, None]],
                                                                 dim=1).reshape(-1)
                self._send(rank, msg)
            elif n:
                self._send(rank, torch.tensor([n], dtype=torch.int64, device=self.device),
                           rows.float().contiguous().to(self.device), ids.to(torch.int64).contiguous().to(self.device))
            else:
                self._send(rank, self._zero, hold=True)
            if n:
                reply = torch.empty(1 + n * self.hidden, dtype=torch.float32, device=self.device)
                self._post(self._pg.recv([reply], rank, 0))
                pending.append((g, rank, n, reply))

        def wait():
            self._wait()
            out = {}
            for g, rank, n, reply in pending:
                if reply[0].item() != 0:
                    self._failed(rank)
                else:
                    out[g] = reply[1:].view(n, self.hidden)
            if self._left:
                raise PeerFailed(f"expert group(s) at ranks {sorted(self._left)} failed at layer {layer}")
            return out
        return wait

    def end(self):
        """The actors' page reads (they came with the replies); on an error the caller runs
        abort() instead (either releases the step)."""
        self._lock.release()
        return self._reads

    def abort(self, exc: BaseException) -> BaseException:
        """After a failed step: finish the operations in flight, send every actor still in the
        step an abort where it waits next; return the error the step fails with. A broken group
        (an actor died, an operation timed out) is dropped; the next step forms a new one."""
        try:
            broken = self._pg is None or is_transport_error(_cause(exc))
            for w in self._works:
                try:
                    w.wait(STEP_WAIT)
                except Exception:  # noqa: BLE001 - a dead actor's connection
                    broken = True
            self._works = []
            for rank, parts in self._parts.items():  # a live actor's connection works even in a broken group
                if self._pg is None or rank in self._left or rank in self._unsent or self._sent[rank] >= len(parts):
                    continue  # (an actor whose plan was not sent never heard of this step)
                size = parts[self._sent[rank]].request_floats(self.heads, self.head_dim, self.hidden)
                if size:
                    msg = torch.zeros(size, dtype=torch.float32, device=self.device)
                    msg[0] = -1.0
                else:
                    msg = torch.tensor([-1], dtype=torch.int64, device=self.device)
                try:
                    for t in [*self._held.pop(rank, []), msg]:  # what it still has to hear first
                        self._pg.send([t], rank, 0).wait(datetime.timedelta(seconds=5))
                except Exception:  # noqa: BLE001 - this actor died
                    broken = True
            if broken:
                self._drop_group()
            if self._errors:
                return next(iter(self._errors.values()))
            if broken:
                return DataPlaneError(f"the mesh's process group broke under this step ({type(exc).__name__}: "
                                      f"{str(exc)[:200]}); it is formed again at the next step")
            return exc
        finally:
            self._lock.release()

    def close(self) -> None:
        """Leave the group: after the step in flight, if any (bounded by the step timeout)."""
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
