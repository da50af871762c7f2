"""The actor side of the collective data plane (see collective.py for the wire format).

`StepWorker` is mixed into the context shard, the expert group and the colocated worker. When
the router forms a process group (`join_group`, a Ray call), the actor starts a step loop on a
thread of its own: it receives each step's plan over the group, runs its exchanges with its
own `attend` / `compute`, and waits for the next plan. The actor's other methods (begin,
append, stats, ...) keep arriving as Ray calls on the actor's main thread.
"""

from __future__ import annotations

import logging
import threading

import ray
import torch

from expertmesh.dataplane.collective import STOP, StepAborted
from expertmesh.dataplane.socket_group import SocketGroup
from expertmesh.dataplane.transport import is_transport_error, make_group
from expertmesh.dataplane.wire import (
    MAX_PLAN_BYTES,
    WireError,
    WireLimits,
    decode_plan,
    encode_error,
)
from expertmesh.dataplane.wire_whole import decode_request, is_whole
from expertmesh.engine.step_plan import AttendItem, PeerPlan
from expertmesh.engine.whole_step import WholeRequest

log = logging.getLogger("expertmesh.dataplane")


class StepWorker:
    malformed = 0  # connections this actor ended for a malformed message
    steps_served = 0  # steps this actor took part in
    data_device = torch.device("cpu")  # where the exchanged tensors live (cuda with NCCL)
    _ok = torch.zeros(1)  # status 0 (the socket transport moves host tensors only)

    @property
    def _groups(self) -> dict:
        """router -> (its current group, the gloo/NCCL rendezvous client kept while it lives)."""
        return self.__dict__.setdefault("_groups_by_router", {})

    def join_group(self, address, generation: int, rank: int, world: int, backend: str, timeout_s: float,
                   key: bytes, limits: WireLimits, router: str = "") -> str:
        """Join generation `generation` of router `router`'s process group as `rank` (proving it
        holds the generation's `key`; see collective.make_group) and serve its steps; plans are
        checked against `limits`. Each router of the mesh has its own group and step loop here;
        a new generation of one router's group replaces only that router's. Returns the Ray node
        it runs on (the router watches that node while a step waits for this actor: step_watch.py)."""
        address = tuple(address) if backend == "socket" else address
        pg, store = make_group(backend, address, generation, rank, world, timeout_s, key)
        old = self._groups.get(router)
        self._groups[router] = (pg, store)
        if old is not None:  # its loop got STOP from the router or an error; anything left times out
            try:
                old[0].abort()
            except Exception:  # noqa: BLE001 - already broken
                pass
        threading.Thread(target=self._serve, args=(pg, generation, limits, router), daemon=True,
                         name=f"expertmesh-steps-{router or 'router'}-g{generation}").start()
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    @torch.no_grad()
    def _serve(self, pg, generation: int, limits: WireLimits, router: str = "") -> None:
        """The step loop: plan length (int64; STOP ends the loop), the encoded plan (wire.py),
        the exchanges. A malformed message ends this connection (the router forms a new group)."""
        head = torch.empty(1, dtype=torch.int64, device=self.data_device)
        while True:
            try:
                pg.recv([head], 0, 0).wait()
                n = int(head[0])
                if n == STOP:
                    return
                if not 0 < n <= MAX_PLAN_BYTES:
                    raise WireError(f"a step plan of {n} bytes announced; at most {MAX_PLAN_BYTES}")
                buf = torch.empty(n, dtype=torch.uint8, device=self.data_device)
                pg.recv([buf], 0, 0).wait()
                data = buf.cpu().numpy().tobytes()
                if is_whole(data):  # a step computed here whole (engine/whole_step.py)
                    self.run_whole(pg, decode_request(data, limits, generation), router)
                else:
                    self.run_step(pg, decode_plan(data, limits, generation))
            except StepAborted:
                continue
            except WireError as exc:
                self.malformed += 1
                log.error("data plane: a malformed message from the router of generation %d (%s); "
                          "leaving the group", generation, exc)
                pg.abort()
                return
            except Exception as exc:  # noqa: BLE001 - work errors were answered in band; a broken group ends
                if is_transport_error(exc) or pg is not self._groups.get(router, (None,))[0]:
                    return

    def run_step(self, pg, plan: PeerPlan) -> None:
        """Run this actor's exchanges of one step, in the plan's order (pages read travel in the replies)."""
        self.steps_served += 1
        for part in plan.parts:
            if part.kind == "attend":
                self._attend_part(pg, plan, part)
            else:
                self._experts_part(pg, plan, part)

    def run_whole(self, pg, req: WholeRequest, router: str) -> None:
        """A step computed whole here: only an actor holding every shard and group of the mesh
        (the colocated worker) can; the router sends none to another."""
        raise WireError("a whole step sent to an actor that is not a colocated worker")

    def _answer(self, pg, size: int, work) -> None:
        """Send status 0 + the result of `work()` (fp32 tensors, `size` floats in all); or status 1, then
        the error as (kind, message) (wire.py: int64 length, bytes), and re-raise it (the router
        then ends the step for everyone)."""
        try:
            body = work()
            pieces = [t.reshape(-1) for t in body] if isinstance(body, list) else [body.reshape(-1)]
        except BaseException as exc:
            reply = torch.zeros(size, dtype=torch.float32, device=self.data_device)
            reply[0] = 1.0
            pg.send([reply], 0, 0).wait()
            data = encode_error(exc)
            pg.send([torch.tensor([len(data)], dtype=torch.int64, device=reply.device)], 0, 0).wait()
            pg.send([torch.frombuffer(bytearray(data), dtype=torch.uint8).to(reply.device)], 0, 0).wait()
            raise
        if isinstance(pg, SocketGroup):  # status and pieces back to back in one write, no copy
            pg.send([self._ok, *(p.contiguous() for p in pieces)], 0, 0)
            return
        pg.send([torch.cat([torch.zeros(1, device=self.data_device), *pieces])], 0, 0).wait()

    def _attend_part(self, pg, plan: PeerPlan, part) -> list:
        hq_d, n_items = plan.heads * plan.head_dim, len(part.items)
        msg = torch.empty(part.request_floats(plan.heads, plan.head_dim, plan.hidden), dtype=torch.float32,
                          device=self.data_device)
        pg.recv([msg], 0, 0).wait()
        flags = msg[:n_items].tolist()
        if flags and flags[0] < 0:
            raise StepAborted("the router ended the step")
        if any(f not in (0.0, 1.0) for f in flags):
            raise WireError(f"attention flags must be 0 or 1, got {sorted(set(flags))[:4]}")
        items, at, order = [], n_items, []
        for j, (context_id, t, q_pos, visits, top_pages, segment) in enumerate(part.items):
            if flags[j]:
                q = msg[at:at + t * hq_d].view(t, plan.heads, plan.head_dim)
                items.append(AttendItem(context_id, q, q_pos, visits, top_pages, segment))
                order.append(j)
            at += t * hq_d
        if not items:
            return
        got = sum(len(it.q_pos) for it in items)

        def work():
            results = self.attend_tensors(part.layer, items)
            body = []
            for o, lse, _ in results:
                body += [torch.as_tensor(o).reshape(-1).to(self.data_device),
                         torch.as_tensor(lse).reshape(-1).to(self.data_device)]
            body.append(torch.tensor([[r.get("pages", 0), r.get("memory", 0), r.get("store", 0)]
                                      for _, _, r in results], dtype=torch.float32, device=self.data_device).reshape(-1))
            return body
        self._answer(pg, 1 + got * plan.heads * (plan.head_dim + 1) + 3 * len(items), work)

    def _experts_part(self, pg, plan: PeerPlan, part) -> None:
        if part.packed:  # one message: count, then up to `packed` rows (+ expert id)
            msg = torch.empty(part.request_floats(plan.heads, plan.head_dim, plan.hidden), dtype=torch.float32,
                              device=self.data_device)
            pg.recv([msg], 0, 0).wait()
            count = msg[0].item()
            if count != -1 and not (count == int(count) and 0 <= count <= part.packed):
                raise WireError(f"an expert exchange of {count} rows; this layer's plan allows 0..{part.packed}")
            n = int(count)
            payload = msg[1:1 + max(n, 0) * (plan.hidden + 1)].view(max(n, 0), plan.hidden + 1)
            rows, ids = payload[:, :plan.hidden], payload[:, plan.hidden].to(torch.int64)
        else:
            head = torch.empty(1, dtype=torch.int64, device=self.data_device)
            pg.recv([head], 0, 0).wait()
            n = head.item()
            if n != -1 and not 0 <= n <= part.pairs:  # checked before the rows are allocated
                raise WireError(f"an expert exchange of {n} rows; this layer's plan allows 0..{part.pairs}")
            if n > 0:
                rows = torch.empty(n, plan.hidden, dtype=torch.float32, device=self.data_device)
                ids = torch.empty(n, dtype=torch.int64, device=self.data_device)
                pg.recv([rows], 0, 0).wait()
                pg.recv([ids], 0, 0).wait()
        if n < 0:
            raise StepAborted("the router ended the step")
        if n == 0:
            return
        self._answer(pg, 1 + n * plan.hidden, lambda: self.compute_tensors(part.layer, rows, ids))
