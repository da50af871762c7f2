"""A whole step over the collective data plane, the router's side (engine/whole_step.py): one
message to the worker holding every shard and group of the mesh, one answer back
(wire_whole.py). Bounded as every step: each operation within STEP_TIMEOUT_S, and the step
watch (step_watch.py) cuts the worker's connection when Ray declares its host dead."""

from __future__ import annotations

import time
import uuid
from typing import Any

import torch

from expertmesh.dataplane.collective_step import STEP_WAIT
from expertmesh.dataplane.transport import is_transport_error
from expertmesh.dataplane.wire import MAX_ERROR_BYTES, WireError, decode_error
from expertmesh.dataplane.wire_whole import MAX_META_BYTES, decode_meta, encode_request
from expertmesh.engine.whole_step import WholeReply, WholeRequest
from expertmesh.errors import DataPlaneError


def whole_rank(ex: Any) -> int | None:
    """The rank of the one member holding every context shard and expert group of the mesh (a
    colocated worker), where steps can go to it whole; else None (the group formed: `absent()`)."""
    if ex.backend != "socket" or len(ex.peers) != 1 or ex.left_shards or ex.left_groups:
        return None
    _, shard, group = ex.peers[0]
    if shard != 0 or group != 0:
        return None
    return ex.ranks.get(0)


def incarnation() -> str:
    return uuid.uuid4().hex[:16]


def run_whole(ex: Any, req: WholeRequest, vocab: int, experts: int, groups: int) -> WholeReply:
    """Send the step, read the answer: logits [rows, vocab] and the reports (checked)."""
    ex._lock.acquire()
    try:
        if ex._pg is None:
            ex._form_group()
        rank = whole_rank(ex)
        if rank is None:
            raise DataPlaneError("the mesh's group changed under a whole step; it runs again per layer")
        data = encode_request(req, ex.generation)
        ex.step_started = time.monotonic()
        ex.steps += 1
        expected = sum(s.logits_rows for s in req.seqs)
        try:
            tensors = ex._held.pop(rank, [])
            tensors += [torch.tensor([len(data)], dtype=torch.int64), torch.frombuffer(bytearray(data), dtype=torch.uint8)]
            ex._pg.send(tensors, rank, 0).wait(STEP_WAIT)
            head = torch.empty(3, dtype=torch.int64)
            ex._pg.recv([head], rank, 0).wait(STEP_WAIT)
            status, n, rows = (int(v) for v in head)
            if status == 1:
                if not 0 < n <= MAX_ERROR_BYTES:
                    raise WireError(f"an error of {n} bytes announced; at most {MAX_ERROR_BYTES}")
                buf = torch.empty(n, dtype=torch.uint8)
                ex._pg.recv([buf], rank, 0).wait(STEP_WAIT)
                raise decode_error(buf.numpy().tobytes(), rank)
            if status != 0 or not 0 < n <= MAX_META_BYTES or rows != expected:
                raise WireError(f"a whole step's answer of status {status}, {n} meta bytes and {rows} logits rows; "
                                f"expected status 0 or 1, at most {MAX_META_BYTES} bytes and {expected} rows")
            meta, logits = torch.empty(n, dtype=torch.uint8), torch.empty(rows, vocab, dtype=torch.float32)
            ex._pg.recv([meta], rank, 0).wait(STEP_WAIT)
            if rows:
                ex._pg.recv([logits], rank, 0).wait(STEP_WAIT)
            return decode_meta(meta.numpy().tobytes(), logits, ex.limits, len(req.seqs), experts, groups)
        except WireError as exc:
            ex.malformed += 1
            ex._count()
            ex._drop_group()
            raise DataPlaneError(f"the worker sent a malformed answer ({exc}); the group is formed again") from None
        except Exception as exc:
            if is_transport_error(exc):
                ex._drop_group()
                raise DataPlaneError(f"the mesh's process group broke under this step ({type(exc).__name__}: "
                                     f"{str(exc)[:200]}); it is formed again at the next step") from None
            raise
    finally:
        ex.step_started = None
        ex._lock.release()
