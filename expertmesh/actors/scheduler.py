"""Continuous batching: which sequences run in the next router step.

Every running sequence decodes one token per step; waiting sequences (new requests,
context segments) join between steps while the step's token budget allows.
"""

from __future__ import annotations

from collections import deque

from expertmesh.actors.sequence import Sequence


class Scheduler:
    def __init__(self, max_batch_tokens: int = 16384, max_running: int = 256) -> None:
        self.max_batch_tokens, self.max_running = max_batch_tokens, max_running
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> list[Sequence]:
        batch = list(self.running)
        budget = self.max_batch_tokens - len(batch)
        while self.waiting and len(batch) < self.max_running:
            need = len(self.waiting[0].token_ids) - self.waiting[0].num_computed
            if need > budget and batch:  # a long prefill runs alone rather than never
                break
            batch.append(self.waiting.popleft())
            budget -= need
        return batch

    def keep_running(self, seq: Sequence) -> None:
        if seq not in self.running:
            self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
