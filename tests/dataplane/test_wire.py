"""The data plane's data-only encodings (wire.py), without Ray: plans round-trip; anything
else (random bytes, truncations, mutations, pickles, extension types, sizes past the plan's
bounds, another version or generation) raises WireError and builds nothing but data; errors
come back as one of a fixed set of the project's classes."""

import os
import pickle
import random

import msgpack
import numpy as np
import pytest

from expertmesh.dataplane.wire import (
    ERROR_KINDS,
    MAX_ERROR_BYTES,
    MAX_PLAN_BYTES,
    MAX_STEP_ROWS,
    WireError,
    WireLimits,
    decode_error,
    decode_plan,
    encode_error,
    encode_plan,
)
from expertmesh.engine.step_plan import Part, PeerPlan
from expertmesh.errors import (
    CapacityError,
    ContextNotFound,
    InvalidRequest,
    MeshActorError,
)
from expertmesh.store.pages import StoreCorrupted

LIMITS = WireLimits(heads=4, head_dim=8, hidden=32, num_layers=3)


def plan(generation=5):
    q_pos = np.arange(100, 112, dtype=np.int64)
    return PeerPlan(generation, (
        Part("attend", 0, (("ctx-a", 12, q_pos, {"r1": 10, "r2": 2}, None, ("seg-0.kv", 0, 4096)),
                           ("ctx-b", 3, np.array([7, 8, 9]), {"r3": 3}, 2, None))),
        Part("experts", 0, packed=36, pairs=36),
        Part("attend", 2, (("ctx-a", 12, q_pos.copy(), {"r1": 10, "r2": 2}, None, ("seg-0.kv", 0, 4096)),)),
        Part("experts", 2, packed=0, pairs=36),
    ), 4, 8, 32)


def test_a_plan_round_trips_and_repeated_positions_travel_once():
    p = plan()
    data = encode_plan(p, rows=18)
    got = decode_plan(data, LIMITS, generation=5)
    assert got.generation == 5 and (got.heads, got.head_dim, got.hidden) == (4, 8, 32)
    assert [(x.kind, x.layer, x.packed, x.pairs) for x in got.parts] == [(x.kind, x.layer, x.packed, x.pairs)
                                                                         for x in p.parts]
    for a, b in zip(got.parts, p.parts):
        for ia, ib in zip(a.items, b.items):
            assert ia[0] == ib[0] and ia[1] == ib[1] and np.array_equal(ia[2], ib[2]) and ia[3:] == ib[3:]
    assert len(msgpack.unpackb(data)[7]) == 2  # the 12 positions of ctx-a once, though on two layers


@pytest.mark.parametrize("mutate, match", [
    (lambda m: m.__setitem__(1, 2), "version 2"),
    (lambda m: m.__setitem__(0, "other"), "not a step plan"),
    (lambda m: m.__setitem__(2, 4), "generation 4"),
    (lambda m: m.__setitem__(4, 16), "heads/head_dim/hidden"),
    (lambda m: m.__setitem__(6, MAX_STEP_ROWS + 1), "rows"),
    (lambda m: m[8][0].__setitem__(1, 3), "layer"),  # the mesh has layers 0..2
    (lambda m: m[8][0][2][0].__setitem__(1, 13), "positions"),  # 13 rows, 12 positions
    (lambda m: m[8][0][2][0].__setitem__(1, 10**6), "item rows"),
    (lambda m: m[8][0][2][0].__setitem__(2, 9), "array index"),
    (lambda m: m[8][1].__setitem__(2, 10**6), "packed"),
    (lambda m: m[8][3].__setitem__(3, 18 * 64 + 1), "pairs"),
    (lambda m: m[8][0][2][0].__setitem__(0, "x" * 5000), "context id"),
    (lambda m: m[8][0][2][0].__setitem__(0, 7), "context id"),
    (lambda m: m[8][0][2][0].__setitem__(3, {"r1": 1}), "malformed"),  # maps are not part of the format
    (lambda m: m[8][0].__setitem__(0, "z"), "neither"),
    (lambda m: m[7].__setitem__(0, b"\0" * 7), "position array"),
])
def test_a_plan_outside_the_bounds_is_refused_with_a_reason(mutate, match):
    msg = msgpack.unpackb(encode_plan(plan(), rows=18))
    mutate(msg)
    with pytest.raises(WireError, match=match):
        decode_plan(msgpack.packb(msg, use_bin_type=True), LIMITS, generation=5)


def test_random_truncated_and_mutated_bytes_only_raise_wire_error():
    rng = random.Random(19)
    good = encode_plan(plan(), rows=18)
    cases = [os.urandom(rng.randrange(1, 300)) for _ in range(500)]
    cases += [good[:k] for k in range(len(good))]
    for _ in range(2000):
        b = bytearray(good)
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        cases.append(bytes(b))
    cases += [msgpack.packb(msgpack.ExtType(1, b"x" * 10)), msgpack.packb({"a": 1}), b"\xdd\xff\xff\xff\xff",
              b"\x91" * 100_000]  # an extension type, a map, a 4G-element array header, deep nesting
    decoded = 0
    for data in cases:
        try:
            p = decode_plan(data, LIMITS, generation=5)
        except WireError:
            continue
        decoded += 1  # a mutation that kept the plan valid: it is still only data within the bounds
        assert isinstance(p, PeerPlan) and all(isinstance(x, Part) for x in p.parts)
        assert all(it[1] <= 18 and len(it[2]) == it[1] for x in p.parts for it in x.items)
    assert decoded < len(cases) // 2


def test_a_pickle_is_never_loaded(tmp_path):
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    payload = pickle.dumps(Exploit())
    for decode in (lambda b: decode_plan(b, LIMITS, 5), lambda b: decode_error(b, 1)):
        with pytest.raises(WireError):
            decode(payload)
    assert not marker.exists()


def test_oversized_messages_are_refused_before_decoding():
    with pytest.raises(WireError, match="at most"):
        decode_plan(b"\0" * (MAX_PLAN_BYTES + 1), LIMITS, 5)
    with pytest.raises(WireError, match="at most"):
        decode_error(b"\0" * (MAX_ERROR_BYTES + 1), 1)
    with pytest.raises(ValueError, match="token rows exceeds"):
        encode_plan(plan(), rows=MAX_STEP_ROWS + 1)


@pytest.mark.parametrize("exc, cls", [
    (ContextNotFound("context 'c' has no segment on shard 1"), ContextNotFound),
    (CapacityError("does not fit"), CapacityError),
    (StoreCorrupted("page 3 fails its checksum"), StoreCorrupted),
    (ValueError("layer 9 is not an MoE layer"), InvalidRequest),
    (ZeroDivisionError("division by zero"), MeshActorError),
    (KeyError("x"), MeshActorError),
])
def test_errors_become_one_of_the_fixed_classes(exc, cls):
    got = decode_error(encode_error(exc), rank=3)
    assert type(got) is cls and str(exc).strip("'") in str(got)
    assert isinstance(got, ValueError) == isinstance(exc, ValueError)  # HTTP 400 stays 400
    if cls is MeshActorError:
        assert type(exc).__name__ in str(got) and "rank 3" in str(got)


def test_an_error_of_another_kind_or_size_is_refused():
    with pytest.raises(WireError, match="unknown kind"):
        decode_error(msgpack.packb(["emerr", 1, "SystemExit", "bye"]), 1)
    assert len(encode_error(ValueError("é" * 100_000))) <= MAX_ERROR_BYTES
    assert set(ERROR_KINDS) == {"ContextNotFound", "CapacityError", "StoreCorrupted", "Unavailable", "InvalidRequest",
                                "MeshActorError"}
