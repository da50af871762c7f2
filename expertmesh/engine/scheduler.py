"""Continuous batching: which sequences run in the next router step.

Every ready sequence decodes one token per step; waiting sequences (new requests, context
segments) join between steps while the step's token budget allows. With `lanes` > 1 the
router runs that many step loops, each over its share of the sequences, so one lane computes
while another waits on its remote calls (two-batch overlap).
"""

from __future__ import annotations

import math
from collections import deque

from expertmesh.engine.sequence import Sequence


class Scheduler:
    def __init__(self, max_batch_tokens: int = 16384, max_running: int = 256, lanes: int = 1) -> None:
        if lanes < 1:
            raise ValueError(f"lanes must be >= 1, got {lanes}")
        self.max_batch_tokens, self.max_running, self.lanes = max_batch_tokens, max_running, lanes
        self.waiting: deque[Sequence] = deque()  # not started
        self.ready: deque[Sequence] = deque()  # decoding, between steps
        self.in_flight = 0  # sequences inside a running step

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def discard(self, seq: Sequence) -> bool:
        """Take a sequence out before its next step (a request past its deadline); False when it
        is not waiting here (inside a running step, or finished)."""
        for queue in (self.waiting, self.ready):
            i = next((i for i, s in enumerate(queue) if s is seq), None)  # by identity: no field compares
            if i is not None:
                del queue[i]
                return True
        return False

    def __len__(self) -> int:
        return len(self.waiting) + len(self.ready) + self.in_flight

    def schedule(self) -> list[Sequence]:
        """The next step's batch: this lane's share of ready sequences, then admissions."""
        share = min(self.max_running, math.ceil(len(self) / self.lanes))
        batch = [self.ready.popleft() for _ in range(min(share, len(self.ready)))]
        budget = self.max_batch_tokens - len(batch)
        self._fair_order()
        while self.waiting and len(batch) < share:
            need = len(self.waiting[0].token_ids) - self.waiting[0].num_computed
            if need > budget and batch:  # a long prefill runs alone rather than never
                break
            batch.append(self.waiting.popleft())
            budget -= need
        self.in_flight += len(batch)
        return batch

    def _fair_order(self) -> None:
        """Interleave waiting sequences by tenant, so one tenant's flood cannot starve others."""
        tenants: dict[str, list[Sequence]] = {}
        for seq in self.waiting:
            tenants.setdefault(seq.tenant, []).append(seq)
        if len(tenants) > 1:
            queues = list(tenants.values())
            order = [q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q)]
            self.waiting = deque(order)

    def step_done(self, batch: list[Sequence]) -> None:
        self.in_flight -= len(batch)

    def keep_running(self, seq: Sequence) -> None:
        self.ready.append(seq)
