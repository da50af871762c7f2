"""Micro-batches in ping-pong (engine/ping_pong.py): the two halves of a step take turns at
every exchange operation in a fixed order, compute one at a time, overlap one's waits with the
other's compute, and a failing half stops the other; each actor's slice interleaves the
halves' parts in that same order (step_plan.interleave)."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from expertmesh.engine.ping_pong import PingPong
from expertmesh.engine.step_plan import Part, PeerPlan, interleave
from expertmesh.mesh_spec import MeshSpec


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(1) as p:
        yield p


def _exchange(turns, i, log, what, wait_s=0.0):
    """One exchange of half i as TakingTurns runs it: its turn from the send to the replies."""
    turns.take(i)
    log.append((i, *what, "send"))

    def replies():
        log.append((i, *what, "replies"))
        time.sleep(wait_s)  # the answers travel: the other half may compute
    turns.finish(i, replies)


def _half(turns, i, log, layers=3, fail_at=None, wait_s=0.0):
    def run():
        for layer in range(layers):
            for kind in ("attention", "experts"):
                if fail_at == (layer, kind):
                    raise RuntimeError(f"half {i} failed at {layer} {kind}")
                _exchange(turns, i, log, (layer, kind), wait_s)
        return f"x{i}"
    return run


def test_halves_take_turns_in_a_fixed_order(pool):
    """Per layer: A's attention (sent, answers read), B's, A's experts, B's: every connection
    carries one request at a time, in the order of each actor's interleaved plan."""
    log = []
    turns = PingPong(2)
    assert turns.run(pool, [_half(turns, 0, log), _half(turns, 1, log)]) == ["x0", "x1"]
    expected = [(h, layer, kind, op) for layer in range(3) for kind in ("attention", "experts") for h in (0, 1)
                for op in ("send", "replies")]
    assert log == expected


def test_one_half_waits_while_the_other_computes(pool):
    """One half's compute overlaps the other's wait for answers: every wait of a half sees the
    other half start a compute, but the step's last and, when half 1 happened to compute its
    first layer before half 0 sent, half 0's first. Each wait blocks until that happens (up to
    2 s), so a schedule that kept the compute lock through a wait fails here instead of merely
    running slower (no wall-clock bound: the test holds on a loaded machine)."""
    turns = PingPong(2)
    layers = 4
    cond = threading.Condition()
    computes = [0, 0]
    overlapped = {0: [], 1: []}

    def half(i):
        other = 1 - i

        def run():
            for layer in range(layers):
                with cond:  # dense layers (the half holds the compute lock)
                    computes[i] += 1
                    cond.notify_all()
                time.sleep(0.002)
                turns.take(i)
                seen = computes[other]  # the other half cannot compute before this one lets go

                def replies():
                    with cond:
                        if computes[other] < layers:
                            overlapped[i].append(cond.wait_for(lambda: computes[other] > seen, timeout=2))
                turns.finish(i, replies)
            return i
        return run
    t0 = time.perf_counter()
    assert turns.run(pool, [half(0), half(1)]) == [0, 1]
    print(f"ping-pong wall {time.perf_counter() - t0:.3f} s, overlapped waits {overlapped}")
    # half 1: its first 3 waits overlap half 0's next layers (none left during its last); half 0:
    # each wait overlaps one of half 1's computes, but the first if half 1 computed before it sent
    assert overlapped[1] == [True] * (layers - 1), overlapped
    assert overlapped[0][1:] == [True] * (layers - 1) and len(overlapped[0]) == layers, overlapped


def test_a_failing_half_stops_the_other_and_its_error_is_raised(pool):
    log = []
    turns = PingPong(2)
    with pytest.raises(RuntimeError, match="half 1 failed at 1 experts"):
        turns.run(pool, [_half(turns, 0, log), _half(turns, 1, log, fail_at=(1, "experts"))])
    assert (0, 2, "attention", "send") not in log  # half 0 went no further than its next turn
    turns = PingPong(2)
    with pytest.raises(RuntimeError, match="half 0 failed at 0 attention"):
        turns.run(pool, [_half(turns, 0, log, fail_at=(0, "attention")), _half(turns, 1, log)])


def test_a_half_that_ends_first_lets_the_other_go_on(pool):
    log = []
    turns = PingPong(2)
    assert turns.run(pool, [_half(turns, 0, log, layers=1), _half(turns, 1, log, layers=3)]) == ["x0", "x1"]
    assert log[-1] == (1, 2, "experts", "replies")


def _peer(layers, tag):
    parts = []
    for layer in layers:
        parts.append(Part("attend", layer, ((f"ctx-{tag}", 1, None, {}, None, None),)))
        parts.append(Part("experts", layer, pairs=2))
    return PeerPlan(1, tuple(parts), 4, 8, 32)


def test_interleave_orders_each_layers_attention_then_experts_half_by_half():
    a, b = _peer([0, 1], "a"), _peer([1], "b")
    merged = interleave([a, b])
    assert [(p.kind, p.layer, p.items[0][0] if p.items else None) for p in merged.parts] == [
        ("attend", 0, "ctx-a"), ("experts", 0, None),
        ("attend", 1, "ctx-a"), ("attend", 1, "ctx-b"), ("experts", 1, None), ("experts", 1, None)]
    assert interleave([None, b]) is b and interleave([None, None]) is None and interleave([a]) is a


def test_micro_batches_is_checked():
    assert MeshSpec(micro_batches=2).micro_batches == 2
    for bad in (0, 3, True, "2"):
        with pytest.raises(ValueError, match="micro_batches must be 1 or 2"):
            MeshSpec(micro_batches=bad)
