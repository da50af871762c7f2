"""The data plane's join handshake and the actor's step loop, attacked with raw sockets (no
Ray): a stranger that knows the port, the generation and a rank is refused and reads nothing
but a nonce; a replayed proof fails; stalls and floods neither delay nor displace a member;
an actor will not talk to a router that cannot prove the key; an actor's step loop ends its
connection on a malformed or oversized plan without allocating what the peer announced."""

import datetime
import os
import pickle
import secrets
import socket
import struct
import threading
import time

import msgpack
import numpy as np
import pytest
import torch

from expertmesh.dataplane.handshake import (
    HANDSHAKE_TIMEOUT_S,
    HELLO,
    MAGIC,
    NONCE,
    VERSION,
    new_key,
)
from expertmesh.dataplane.socket_group import Listener, SocketGroup
from expertmesh.dataplane.step_worker import StepWorker
from expertmesh.dataplane.wire import WireLimits, encode_plan
from expertmesh.engine.step_plan import Part, PeerPlan

DAY = datetime.timedelta(days=1)


def hello(generation, rank, magic=MAGIC, version=VERSION):
    return HELLO.pack(magic, version, generation, rank, secrets.token_bytes(NONCE))


def stranger(address, unix=False):
    if unix:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect("\0" + address[2])
    else:
        s = socket.create_connection(address[:2])
    s.settimeout(HANDSHAKE_TIMEOUT_S + 5)
    return s


def read_all(s):
    """Everything the router sends a connection until it closes it."""
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return got


def form(listener, key, generation, world, delay=0.2, timeout=10.0):
    """Accept a group while its real actors connect after `delay` (strangers go first)."""
    peers = {}

    def join(rank):
        time.sleep(delay)
        peers[rank] = SocketGroup.connect(listener.address, key, generation, rank, 5.0, DAY, 5.0)
    threads = [threading.Thread(target=join, args=(r,)) for r in range(1, world)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    router = SocketGroup.accept(listener, key, generation, world, timeout, DAY, 5.0)
    took = time.monotonic() - t0
    for t in threads:
        t.join(5)
    return router, peers, took


def members_are_the_actors(router, peers):
    """Each admitted connection reaches the actor of its rank."""
    for rank, peer in peers.items():
        router.send([torch.tensor([float(rank)])], rank, 0)
        got = torch.empty(1)
        peer.recv([got], 0, 0).wait(datetime.timedelta(seconds=5))
        assert got.item() == rank


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
def test_a_stranger_with_port_generation_and_rank_is_refused_and_reads_only_a_nonce(unix, tmp_path):
    listener, key = Listener("127.0.0.1"), new_key()
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    s = stranger(listener.address, unix)
    s.sendall(hello(1, 1))  # rank 1 of the generation being formed
    received = {}

    def attack():
        nonce = s.recv(NONCE)
        s.sendall(os.urandom(32) + pickle.dumps(Exploit()) * 100)  # a forged proof, then a pickle
        received["bytes"] = nonce + read_all(s)
    t = threading.Thread(target=attack)
    t.start()
    router, peers, _ = form(listener, key, 1, 3)
    t.join(10)
    assert set(router.conns) == {1, 2} and router.refused == 1
    members_are_the_actors(router, peers)
    assert len(received["bytes"]) == NONCE  # nothing but the challenge, then the connection closed
    assert not marker.exists()
    listener.close()


def test_a_replayed_handshake_is_refused():
    listener, key = Listener("127.0.0.1"), new_key()
    # what the real actor of rank 1 sends, as seen on the wire by an eavesdropper
    tap = socket.create_server(("127.0.0.1", 0))
    seen = {}

    def fake_router():
        conn, _ = tap.accept()
        h = conn.recv(HELLO.size, socket.MSG_WAITALL)
        conn.sendall(b"n" * NONCE)
        seen["wire"] = h + conn.recv(32, socket.MSG_WAITALL)
        conn.close()
    t = threading.Thread(target=fake_router)
    t.start()
    with pytest.raises((RuntimeError, OSError)):
        SocketGroup.connect(("127.0.0.1", tap.getsockname()[1], ""), key, 1, 1, 5.0, DAY, 5.0)
    t.join(5)
    s = stranger(listener.address)
    s.sendall(seen["wire"])  # the same hello and proof, to the real router
    router, peers, _ = form(listener, key, 1, 2)
    assert router.refused == 1 and set(router.conns) == {1}
    assert len(read_all(s)) == NONCE
    members_are_the_actors(router, peers)
    listener.close()


def test_an_actor_refuses_a_router_that_cannot_prove_the_key():
    tap = socket.create_server(("127.0.0.1", 0))

    def impostor():
        conn, _ = tap.accept()
        conn.recv(HELLO.size, socket.MSG_WAITALL)
        conn.sendall(os.urandom(NONCE))
        conn.recv(32, socket.MSG_WAITALL)
        conn.sendall(os.urandom(32))
        time.sleep(1)
        conn.close()
    t = threading.Thread(target=impostor)
    t.start()
    with pytest.raises(RuntimeError, match="did not prove the group key"):
        SocketGroup.connect(("127.0.0.1", tap.getsockname()[1], ""), new_key(), 1, 1, 5.0, DAY, 5.0)
    t.join(5)


BAD_HELLOS = {
    "wrong generation": lambda: hello(2, 1),
    "older generation": lambda: hello(0, 1),
    "rank 0": lambda: hello(1, 0),
    "rank past the world": lambda: hello(1, 3),
    "negative rank": lambda: hello(1, -1),
    "bad magic": lambda: hello(1, 1, magic=b"GET / HT"),
    "other version": lambda: hello(1, 1, version=2),
    "an HTTP request": lambda: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"x" * 64,
    "truncated": lambda: hello(1, 1)[:20],
    "oversized": lambda: hello(1, 1) + os.urandom(4 << 20),
    "random": lambda: os.urandom(HELLO.size),
    "nothing": lambda: b"",
}


def test_malformed_stalled_and_flooding_handshakes_neither_delay_nor_displace_a_member():
    listener, key = Listener("127.0.0.1"), new_key()
    strangers = []
    for name, make in BAD_HELLOS.items():
        s = stranger(listener.address, unix=len(strangers) % 2 == 1)
        threading.Thread(target=lambda s=s, b=make(): _send_quietly(s, b), daemon=True).start()
        strangers.append((name, s))
    for _ in range(100):  # a flood of silent connections (more than the handshakes kept at once)
        strangers.append(("silent", stranger(listener.address)))
    squatter = stranger(listener.address)  # claims rank 1 and never proves it
    squatter.sendall(hello(1, 1))
    strangers.append(("squatter", squatter))
    router, peers, took = form(listener, key, 1, 3, delay=0.5)
    assert took < HANDSHAKE_TIMEOUT_S, f"a stall delayed the members ({took:.1f} s)"
    assert set(router.conns) == {1, 2}
    members_are_the_actors(router, peers)
    for name, s in strangers:  # every stranger's connection is closed; none got more than a nonce
        got = read_all(s)
        assert len(got) <= NONCE, name
        assert len(got) == (NONCE if name in ("squatter", "oversized") else 0), name  # a valid hello gets the challenge
    listener.close()


def _send_quietly(s, data):
    try:
        s.sendall(data)
    except OSError:
        pass  # the router closed it first


# -- the actor's step loop -------------------------------------------------------------------
LIMITS = WireLimits(heads=2, head_dim=4, hidden=8, num_layers=2)


class Worker(StepWorker):
    """An actor's step loop over a small expert layer (the real loop, without a model)."""

    def compute_tensors(self, layer, x, experts):
        return x * 2 + experts[:, None]


def loop_pair():
    router, peers, _ = form(Listener("127.0.0.1"), b"k" * 32, 1, 2, delay=0)
    w = Worker()
    w._groups[""] = (peers[1], None)
    t = threading.Thread(target=w._serve, args=(peers[1], 1, LIMITS), daemon=True)
    t.start()
    return router, w, t


def send_plan(router, data):
    router.send([torch.tensor([len(data)], dtype=torch.int64), torch.frombuffer(bytearray(data), dtype=torch.uint8)],
                1, 0)


def experts_plan(generation=1, packed=0, pairs=4):
    return encode_plan(PeerPlan(generation, (Part("experts", 1, packed=packed, pairs=pairs),), 2, 4, 8), rows=4)


def test_the_step_loop_serves_a_well_formed_plan():
    router, w, t = loop_pair()
    send_plan(router, experts_plan())
    rows, ids = torch.randn(3, 8), torch.tensor([0, 5, 2])
    router.send([torch.tensor([3]), rows, ids], 1, 0)
    reply = torch.empty(1 + 3 * 8)
    router.recv([reply], 1, 0).wait(datetime.timedelta(seconds=5))
    assert reply[0] == 0 and torch.equal(reply[1:].view(3, 8), rows * 2 + ids[:, None])
    assert t.is_alive() and w.malformed == 0


@pytest.mark.parametrize("name", ["plan length 1 TiB", "negative plan length", "garbage plan", "pickled plan",
                                  "another generation", "more expert rows than the plan allows",
                                  "packed count past the plan"])
def test_the_step_loop_ends_the_connection_on_a_malformed_message(name):
    router, w, t = loop_pair()
    if name == "plan length 1 TiB":  # allocating this would take the actor down with it
        router.send([torch.tensor([1 << 40], dtype=torch.int64)], 1, 0)
    elif name == "negative plan length":
        router.send([torch.tensor([-7], dtype=torch.int64)], 1, 0)
    elif name == "garbage plan":
        send_plan(router, os.urandom(200))
    elif name == "pickled plan":
        send_plan(router, pickle.dumps(PeerPlan(1, (), 2, 4, 8)))
    elif name == "another generation":
        send_plan(router, experts_plan(generation=7))
    elif name == "more expert rows than the plan allows":
        send_plan(router, experts_plan(pairs=4))
        router.send([torch.tensor([1 << 40])], 1, 0)
    else:
        send_plan(router, experts_plan(packed=4, pairs=4))
        msg = torch.zeros(1 + 4 * 9)
        msg[0] = 5
        router.send([msg], 1, 0)
    t.join(5)
    assert not t.is_alive() and w.malformed == 1
    with pytest.raises(RuntimeError, match="Connection closed"):  # the actor left: its connection is gone
        router.recv([torch.empty(1)], 1, 0).wait(datetime.timedelta(seconds=5))


def test_positions_decode_as_int64_arrays_not_objects():
    data = encode_plan(PeerPlan(1, (Part("attend", 0, (("c", 2, np.array([3, 4]), {"r": 2}, None, None),)),),
                                2, 4, 8), rows=2)
    assert msgpack.unpackb(data)[7] == [struct.pack("<2q", 3, 4)]
