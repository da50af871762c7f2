"""Two micro-batches of one router step in flight at once (MegaScale-Infer's ping-pong).

The step's sequences are split in two; each half runs the layer loop on a thread of its own.
While one half's rows are at the context shards or expert groups, the other computes its
dense layers. Two rules keep it exact and keep the data plane's order:
  compute: one half at a time (the router's own state, e.g. the KV pool, is not shared
    between threads); a half lets go of it only while it waits for its turn or for replies;
  turns: a half holds the turn from sending an exchange (a layer's queries, or its expert
    rows) until it has read the answers, and the halves take turns, A, B, A, B, ... So every
    actor hears, and the router reads, A's attention of a layer, then B's, then A's experts,
    then B's (`interleave`, step_plan.py), and a connection never carries a second request
    before the first one's reply is read (socket_group.py: a writer blocked on a full buffer
    while the other end writes its reply would wait forever). Both halves run the same layers
    and so make the same number of exchanges; a half with nothing to exchange still takes its turn.
So one half's remote wait overlaps the other's compute (the halves' waits do not overlap).
A half that fails stops the other at its next turn; the step then fails with the first error.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from expertmesh.engine.exchange import Exchange


class _Stopped(Exception):
    """The other half failed: this one ends at its next turn."""


class PingPong:
    """The turns and the compute lock of one step's micro-batches (one object per step)."""

    def __init__(self, halves: int = 2) -> None:
        self.n = halves
        self._cond = threading.Condition()
        self._compute = threading.Lock()
        self._turn = 0
        self._done = [False] * halves
        self._failed = False
        self._waiting: set[int] = set()  # halves waiting for their turn

    def run(self, pool: ThreadPoolExecutor, work: list[Callable[[], Any]]) -> list[Any]:
        """work[i]() for each half (half 0 on this thread, the others on `pool`); their results,
        or the first error (the others stop at their next turn)."""
        futures = [pool.submit(self._half, i, fn) for i, fn in enumerate(work[1:], start=1)]
        results, errors = [None] * self.n, []
        try:
            results[0] = self._half(0, work[0])
        except BaseException as exc:  # noqa: BLE001 - reported below, after the others stopped
            errors.append(exc)
        for i, f in enumerate(futures, start=1):
            try:
                results[i] = f.result()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
        first = [e for e in errors if not isinstance(e, _Stopped)] or errors
        if first:
            raise first[0]
        return results

    def _half(self, i: int, fn: Callable[[], Any]) -> Any:
        self._compute.acquire()
        try:
            return fn()
        except BaseException:
            with self._cond:
                self._failed = True
                self._cond.notify_all()
            raise
        finally:
            with self._cond:
                self._done[i] = True
                if self._turn == i:
                    self._advance()
                self._cond.notify_all()
            self._compute.release()

    def _advance(self) -> None:
        for k in range(1, self.n + 1):  # the next half still running (or none)
            nxt = (self._turn + k) % self.n
            if not self._done[nxt]:
                self._turn = nxt
                return

    def take(self, i: int) -> None:
        """Wait for half i's turn (the other half computes meanwhile)."""
        with self._cond:
            if self._turn == i and not self._failed:
                return  # keep computing: no wait
            self._waiting.add(i)
        self._compute.release()
        try:
            with self._cond:
                while self._turn != i and not self._failed:
                    self._cond.wait()
                if self._failed:
                    raise _Stopped("the step's other micro-batch failed")
        finally:
            self._compute.acquire()  # first: the half that gave the turn waits for this (finish)
            with self._cond:
                self._waiting.discard(i)
                self._cond.notify_all()

    def give(self, i: int) -> None:
        """Half i's exchange is over: the other half's turn."""
        with self._cond:
            if self._turn == i:
                self._advance()
            self._cond.notify_all()

    def finish(self, i: int, replies: Callable[[], Any]) -> Any:
        """Half i reads its exchange's replies (a blocking read, the compute lock let go
        meanwhile), then gives the turn; a half waiting for it sends before this one computes
        again (its rows go out while this one computes: the overlap)."""
        self._compute.release()
        try:
            try:
                return replies()
            finally:
                self.give(i)
                with self._cond:
                    while self._turn != i and self._turn in self._waiting and not self._failed:
                        self._cond.wait()
        finally:
            self._compute.acquire()


class TakingTurns(Exchange):
    """One half's view of its step's exchange: every exchange, from its send to its replies, in
    the half's turn."""

    def __init__(self, inner: Exchange, turns: PingPong, half: int) -> None:
        self.inner, self.turns, self.half = inner, turns, half

    def attend(self, layer, requests):
        return self._exchange(lambda: self.inner.attend(layer, requests))

    def experts(self, layer, requests):
        return self._exchange(lambda: self.inner.experts(layer, requests))

    def _exchange(self, send: Callable[[], Callable[[], Any]]) -> Callable[[], Any]:
        self.turns.take(self.half)
        try:
            wait = send()
        except BaseException:
            self.turns.give(self.half)
            raise

        return lambda: self.turns.finish(self.half, wait)
