"""Micro-batches in ping-pong (actors/ping_pong.py): the two halves of a step take turns at
every exchange operation in a fixed order, compute one at a time, overlap one's waits with the
other's compute, and a failing half stops the other; each actor's slice interleaves the
halves' parts in that same order (step_plan.interleave)."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from expertmesh.actors.ping_pong import PingPong
from expertmesh.actors.step_plan import Part, PeerPlan, interleave
from expertmesh.mesh_spec import MeshSpec


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(1) as p:
        yield p


def _half(turns, i, log, layers=3, fail_at=None, wait_s=0.0):
    def run():
        for layer in range(layers):
            for op in ("send-attn", "wait-attn", "send-experts", "wait-experts"):
                if fail_at == (layer, op):
                    raise RuntimeError(f"half {i} failed at {layer} {op}")

                def act(op=op, layer=layer):
                    log.append((i, layer, op))
                    if op.startswith("wait"):
                        time.sleep(wait_s)  # the answers travel: the other half may compute
                turns.turn(i, act)
        return f"x{i}"
    return run


def test_halves_take_turns_in_a_fixed_order(pool):
    log = []
    turns = PingPong(2)
    assert turns.run(pool, [_half(turns, 0, log), _half(turns, 1, log)]) == ["x0", "x1"]
    expected = [(h, layer, op) for layer in range(3) for op in ("send-attn", "wait-attn", "send-experts", "wait-experts")
                for h in (0, 1)]
    assert log == expected


def test_one_half_waits_while_the_other_computes(pool):
    """One half's compute overlaps the other's wait for answers: the step takes about the
    computes' sum plus one wait, not every compute and wait added up."""
    turns = PingPong(2)

    def half(i):
        def run():
            for layer in range(4):
                time.sleep(0.02)  # dense layers (the half holds the compute lock)
                turns.turn(i, lambda: None)  # send
                turns.turn(i, lambda: time.sleep(0.02))  # wait for the answers
            return i
        return run
    t0 = time.perf_counter()
    assert turns.run(pool, [half(0), half(1)]) == [0, 1]
    wall = time.perf_counter() - t0
    assert wall < 0.29, wall  # one after the other: 2 halves x 4 layers x (20 ms compute + 20 ms wait) = 0.32 s


def test_a_failing_half_stops_the_other_and_its_error_is_raised(pool):
    log = []
    turns = PingPong(2)
    with pytest.raises(RuntimeError, match="half 1 failed at 1 send-experts"):
        turns.run(pool, [_half(turns, 0, log), _half(turns, 1, log, fail_at=(1, "send-experts"))])
    assert (0, 2, "send-attn") not in log  # half 0 went no further than its next turn
    turns = PingPong(2)
    with pytest.raises(RuntimeError, match="half 0 failed at 0 wait-attn"):
        turns.run(pool, [_half(turns, 0, log, fail_at=(0, "wait-attn")), _half(turns, 1, log)])


def test_a_half_that_ends_first_lets_the_other_go_on(pool):
    log = []
    turns = PingPong(2)
    assert turns.run(pool, [_half(turns, 0, log, layers=1), _half(turns, 1, log, layers=3)]) == ["x0", "x1"]
    assert [e for e in log if e[0] == 1][-1] == (1, 2, "wait-experts")


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
