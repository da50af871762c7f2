"""One step over the collective data plane (the router's side; collective.py forms the group).

`start_step(ex, plans)` (ex: the CollectiveExchange of collective.py, untyped here so this module does
not import it back) slices the step's plan for every participating actor; the step's exchanges then
walk it in order (the message layouts are in wire.py). A step may carry two micro-batches
(ping_pong.py): one `CollectiveStep` each, with its own plan, operations and page reads, over
one shared per-actor state (`_Shared`: what each actor was sent, who failed). Each actor gets
one slice with the micro-batches' parts interleaved in the order the router runs them
(`interleave`, step_plan.py), so an actor's step loop is the same either way.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from typing import Any

import torch

from expertmesh.dataplane.transport import is_transport_error
from expertmesh.dataplane.wire import (
    MAX_ERROR_BYTES,
    WireError,
    decode_error,
    encode_plan,
)
from expertmesh.engine.exchange import STEP_TIMEOUT_S, Exchange
from expertmesh.engine.step_plan import StepPlan, interleave, packed_rows
from expertmesh.errors import DataPlaneError

STEP_WAIT = datetime.timedelta(seconds=STEP_TIMEOUT_S)  # one operation of a step; past it the pair closes
log = logging.getLogger("expertmesh.dataplane")


class PeerFailed(RuntimeError):
    """An actor answered an exchange with an error (the router raises the actor's own)."""


def _cause(exc: BaseException) -> BaseException:
    return getattr(exc, "cause", None) or exc


@dataclasses.dataclass
class _Shared:
    """The step's per-actor state, whichever micro-batch is sending."""

    rows: int  # token rows of the step (all micro-batches): the bound of every part
    views: list = dataclasses.field(default_factory=list)
    errors: dict = dataclasses.field(default_factory=dict)  # rank -> its error in this step
    parts: dict = dataclasses.field(default_factory=dict)  # rank -> its parts in this step
    sent: dict = dataclasses.field(default_factory=dict)  # rank -> parts the router has started
    unsent: dict = dataclasses.field(default_factory=dict)  # rank -> its PeerPlan, until its first message
    left: set = dataclasses.field(default_factory=set)  # ranks that left the step with an error
    open: int = 0  # micro-batches not ended yet


def start_step(ex: Any, plans: list[StepPlan]) -> list["CollectiveStep"]:
    """Slice the plans for each participating actor (with the exchange's lock held)."""
    shared = _Shared(rows=sum(p.rows for p in plans), open=len(plans))
    for i, rank in ex.ranks.items():
        _, shard, group = ex.peers[i]
        part = interleave([p.peer(ex.generation, shard, group, ex.heads, ex.head_dim, ex.hidden, ex.pack)
                           for p in plans])
        if part is not None:
            shared.parts[rank], shared.sent[rank], shared.unsent[rank] = part.parts, 0, part
    shared.views = [CollectiveStep(ex, shared, p) for p in plans]
    return shared.views


class CollectiveStep(Exchange):
    """One micro-batch of a step (the whole step without micro-batches)."""

    def __init__(self, ex: Any, shared: _Shared, plan: StepPlan) -> None:
        self.ex, self.shared, self._plan = ex, shared, plan
        self._reads: list = []
        self._works: list = []  # operations not waited for yet

    def _send(self, rank: int, *msgs: torch.Tensor, hold: bool = False) -> None:
        """Messages of the step to `rank`. An actor's slice of the plan travels with its first
        message of the step (an actor wakes when it has work, not at every step's start).
        hold: keep them to go out with the next message to this actor, in this step or a later
        one (a group without rows at a layer has nothing to do: it need not wake for that)."""
        ex = self.ex
        tensors = ex._held.pop(rank, [])
        part = self.shared.unsent.pop(rank, None)
        if part is not None:
            data = encode_plan(part, self.shared.rows)
            tensors += [torch.tensor([len(data)], dtype=torch.int64, device=ex.device),
                        torch.frombuffer(bytearray(data), dtype=torch.uint8).to(ex.device)]
        tensors += msgs
        if hold:
            ex._held[rank] = tensors
        elif ex.backend == "socket":  # back to back in one write
            self._works.append(ex._pg.send(tensors, rank, 0))
        else:
            for t in tensors:
                self._works.append(ex._pg.send([t], rank, 0))

    def _one(self, pieces: list[torch.Tensor]) -> list[torch.Tensor]:
        """A message made of pieces: as they are on a socket (written back to back), one
        tensor for a process group."""
        return pieces if self.ex.backend == "socket" else [torch.cat(pieces)]

    def _wait(self) -> None:
        works, self._works = self._works, []
        for w in works:
            w.wait(STEP_WAIT)

    def _failed(self, rank: int) -> None:
        """An actor answered status 1: its encoded error follows (int64 length, bytes; wire.py).
        A length out of bounds or a message that does not decode ends that connection."""
        ex = self.ex
        self.shared.left.add(rank)
        head = torch.empty(1, dtype=torch.int64, device=ex.device)
        ex._pg.recv([head], rank, 0).wait(STEP_WAIT)
        n = int(head[0])
        try:
            if not 0 < n <= MAX_ERROR_BYTES:
                raise WireError(f"an error of {n} bytes announced; at most {MAX_ERROR_BYTES}")
            buf = torch.empty(n, dtype=torch.uint8, device=ex.device)
            ex._pg.recv([buf], rank, 0).wait(STEP_WAIT)
            self.shared.errors[rank] = decode_error(buf.cpu().numpy().tobytes(), rank)
        except WireError as exc:
            log.error("data plane: rank %d sent a malformed error message (%s); closing its connection", rank, exc)
            ex.malformed += 1
            ex._count()
            close_peer = getattr(ex._pg, "close_peer", None)  # a process group cannot close one pair
            close_peer(rank) if close_peer is not None else ex._pg.abort()
            raise RuntimeError(f"Connection closed: rank {rank} sent a malformed message ({exc})") from None

    def attend(self, layer, requests):
        ex = self.ex
        hq_d, width = ex.heads * ex.head_dim, ex.heads * (ex.head_dim + 1)
        pending = []
        for shard, items in self._plan.layers[layer].attend.items():
            active = dict(requests.get(shard, []))
            flags = torch.tensor([1.0 if j in active else 0.0 for j in range(len(items))], device=ex.device)
            pieces, got = [flags], 0
            for j, it in enumerate(items):
                if j in active:
                    pieces.append(active[j].reshape(-1).float().to(ex.device))
                    got += len(it.rows)
                else:
                    pieces.append(torch.zeros(len(it.rows) * hq_d, dtype=torch.float32, device=ex.device))
            rank = ex.rank_of_shard[shard]
            self.shared.sent[rank] += 1
            self._send(rank, *self._one(pieces))
            order = [j for j in range(len(items)) if j in active]
            reply = torch.empty(1 + got * width + 3 * len(order), dtype=torch.float32, device=ex.device)
            if got:
                self._works.append(ex._pg.recv([reply], rank, 0))
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
                    o = reply[at:at + t * hq_d].view(t, ex.heads, ex.head_dim)
                    parts.append((o, reply[at + t * hq_d:at + t * width].view(t, ex.heads)))
                    self._reads.append((layer, shard, j, {"pages": int(pages), "memory": int(memory),
                                                          "store": int(store)}))
                    at += t * width
                out[shard] = parts
            if self.shared.left:
                raise PeerFailed(f"context shard(s) at ranks {sorted(self.shared.left)} failed at layer {layer}")
            return out
        return wait

    def experts(self, layer, requests):
        ex = self.ex
        if not self._plan.layers[layer].experts:  # no rows at this layer: the actors expect no message
            return dict
        pending = []
        packed = packed_rows(self._plan.layers[layer].pairs, ex.hidden) if ex.pack else 0
        for g in self._plan.groups:
            rows, ids = requests.get(g, (None, None))
            n = 0 if rows is None else rows.shape[0]
            rank = ex.rank_of_group[g]
            self.shared.sent[rank] += 1
            if packed:  # count, rows and expert ids in one fp32 message
                msg = torch.zeros(1 + packed * (ex.hidden + 1), dtype=torch.float32, device=ex.device)
                msg[0] = n
                if n:
                    msg[1:1 + n * (ex.hidden + 1)] = torch.cat([rows.float(), ids.to(torch.float32)[:, None]],
                                                               dim=1).reshape(-1)
                self._send(rank, msg)
            elif n:
                self._send(rank, torch.tensor([n], dtype=torch.int64, device=ex.device),
                           rows.float().contiguous().to(ex.device), ids.to(torch.int64).contiguous().to(ex.device))
            else:
                self._send(rank, ex._zero, hold=True)
            if n:
                reply = torch.empty(1 + n * ex.hidden, dtype=torch.float32, device=ex.device)
                self._works.append(ex._pg.recv([reply], rank, 0))
                pending.append((g, rank, n, reply))

        def wait():
            self._wait()
            out = {}
            for g, rank, n, reply in pending:
                if reply[0].item() != 0:
                    self._failed(rank)
                else:
                    out[g] = reply[1:].view(n, ex.hidden)
            if self.shared.left:
                raise PeerFailed(f"expert group(s) at ranks {sorted(self.shared.left)} failed at layer {layer}")
            return out
        return wait

    def end(self):
        """This micro-batch's page reads (they came with the replies); the step is over when
        every micro-batch has ended. On an error the caller runs abort() instead (once)."""
        self.shared.open -= 1
        if self.shared.open == 0:
            self.ex.step_started = None
            self.ex._lock.release()
        return self._reads

    def abort(self, exc: BaseException) -> BaseException:
        """After a failed step (every micro-batch stopped): finish the operations in flight, send
        every actor still in the step an abort where it waits next; return the error the step
        fails with. A broken group (an actor died, an operation timed out) is dropped; the next
        step forms a new one."""
        ex, shared = self.ex, self.shared
        try:
            broken = ex._pg is None or is_transport_error(_cause(exc))
            for view in shared.views:
                for w in view._works:
                    try:
                        w.wait(STEP_WAIT)
                    except Exception:  # noqa: BLE001 - a dead actor's connection
                        broken = True
                view._works = []
            for rank, parts in shared.parts.items():  # a live actor's connection works even in a broken group
                if ex._pg is None or rank in shared.left or rank in shared.unsent or shared.sent[rank] >= len(parts):
                    continue  # (an actor whose plan was not sent never heard of this step)
                size = parts[shared.sent[rank]].request_floats(ex.heads, ex.head_dim, ex.hidden)
                if size:
                    msg = torch.zeros(size, dtype=torch.float32, device=ex.device)
                    msg[0] = -1.0
                else:
                    msg = torch.tensor([-1], dtype=torch.int64, device=ex.device)
                try:
                    for t in [*ex._held.pop(rank, []), msg]:  # what it still has to hear first
                        ex._pg.send([t], rank, 0).wait(datetime.timedelta(seconds=5))
                except Exception:  # noqa: BLE001 - this actor died
                    broken = True
            if broken:
                ex._drop_group()
            if shared.errors:
                return next(iter(shared.errors.values()))
            if broken:
                return DataPlaneError(f"the mesh's process group broke under this step ({type(exc).__name__}: "
                                      f"{str(exc)[:200]}); it is formed again at the next step")
            return exc
        finally:
            ex.step_started = None
            ex._lock.release()

