"""Two micro-batches of one router step in flight at once (MegaScale-Infer's ping-pong).

The step's sequences are split in two; each half runs the layer loop on a thread of its own.
While one half's rows are at the context shards or expert groups, the other computes its
dense layers. Two rules keep it exact and keep the data plane's order:
  compute: one half at a time (the router's own state, e.g. the KV pool, is not shared
    between threads); a half lets go of it only while it waits for its turn or for replies;
  turns: the halves take turns at every exchange operation (send a layer's queries or rows,
    then wait for the answers), A, B, A, B, ... so every actor hears, and the router reads,
    A's attention of a layer, then B's, then A's experts, then B's (`interleave`, step_plan.py).
    Both halves run the same layers and so make the same number of operations; a half with
    nothing to exchange at an operation still takes its turn.
A half that fails stops the other at its next turn; the step then fails with the first error.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from expertmesh.actors.exchange import Exchange


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

    def turn(self, i: int, op: Callable[[], Any]) -> Any:
        """Run one exchange operation of half i in its turn (the other half computes meanwhile)."""
        self._compute.release()
        try:
            with self._cond:
                while self._turn != i and not self._failed:
                    self._cond.wait()
                if self._failed:
                    raise _Stopped("the step's other micro-batch failed")
            try:
                return op()
            finally:
                with self._cond:
                    self._advance()
                    self._cond.notify_all()
        finally:
            self._compute.acquire()


class TakingTurns(Exchange):
    """One half's view of its step's exchange: every operation in the half's turn."""

    def __init__(self, inner: Exchange, turns: PingPong, half: int) -> None:
        self.inner, self.turns, self.half = inner, turns, half

    def attend(self, layer, requests):
        wait = self.turns.turn(self.half, lambda: self.inner.attend(layer, requests))
        return lambda: self.turns.turn(self.half, wait)

    def experts(self, layer, requests):
        wait = self.turns.turn(self.half, lambda: self.inner.experts(layer, requests))
        return lambda: self.turns.turn(self.half, wait)
