"""The socket transport of the collective data plane, without Ray: tensors arrive intact, a
dead peer or a silent one fails within the bound with an error the router treats as a broken
group, an actor of an older group cannot join a newer one, and abort wakes a blocked reader."""

import datetime
import socket
import threading
import time

import pytest
import torch

from expertmesh.dataplane.handshake import new_key
from expertmesh.dataplane.socket_group import Listener, SocketGroup
from expertmesh.dataplane.transport import is_transport_error

DAY = datetime.timedelta(days=1)


def pair(generation=1, world=2, wait=DAY, send_timeout_s=5.0, same_host=True):
    """Rank 0 and ranks 1.. of one group: over the Unix socket (same host) or TCP loopback."""
    listener = Listener("127.0.0.1")
    address, key = listener.address, new_key()
    peers = {}

    def join(rank):
        peers[rank] = SocketGroup.connect(address, key, generation, rank, 5.0, wait, send_timeout_s, same_host)
    threads = [threading.Thread(target=join, args=(r,)) for r in range(1, world)]
    for t in threads:
        t.start()
    router = SocketGroup.accept(listener, key, generation, world, 5.0, wait, send_timeout_s)
    for t in threads:
        t.join()
    listener.close()
    return router, peers


@pytest.mark.parametrize("same_host", [True, False], ids=["unix", "tcp"])
def test_tensors_of_each_dtype_arrive_intact_in_order(same_host):
    router, peers = pair(world=3, same_host=same_host)
    assert {c.family for c in router.conns.values()} == {socket.AF_UNIX if same_host else socket.AF_INET}
    sent = [torch.randn(1000), torch.arange(7, dtype=torch.int64), torch.randint(0, 255, (3_000_000,), dtype=torch.uint8)]
    got = {rank: [torch.empty_like(t) for t in sent] for rank in (1, 2)}

    def read(rank):  # an actor's step loop reads while the router writes (sends block on a full buffer)
        for g in got[rank]:
            peers[rank].recv([g], 0, 0).wait()
    readers = [threading.Thread(target=read, args=(rank,)) for rank in (1, 2)]
    for t in readers:
        t.start()
    for rank in (1, 2):
        router.send(sent[:2], rank, 0).wait()  # several tensors back to back
        router.send(sent[2:], rank, 0).wait()
    for t in readers:
        t.join(10)
    assert all(torch.equal(a, b) for rank in (1, 2) for a, b in zip(got[rank], sent))
    reply = torch.tensor([3.5, -1.0])
    peers[2].send([reply], 0, 0)
    back = torch.empty(2)
    router.recv([back], 2, 0).wait(datetime.timedelta(seconds=5))
    assert torch.equal(back, reply)


def test_a_dead_peer_fails_the_wait_at_once_as_a_transport_error():
    router, peers = pair()
    peers[1].abort()  # its connection closes, as when its process dies
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="Connection closed") as err:
        router.recv([torch.empty(4)], 1, 0).wait(datetime.timedelta(seconds=30))
    assert time.monotonic() - t0 < 5 and is_transport_error(err.value)
    with pytest.raises(RuntimeError, match="Connection closed"):  # and the link is gone for good
        router.send([torch.empty(4)], 1, 0)


def test_a_silent_peer_times_out_within_the_bound():
    router, peers = pair()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="Timed out") as err:
        router.recv([torch.empty(4)], 1, 0).wait(datetime.timedelta(seconds=0.3))
    assert 0.25 < time.monotonic() - t0 < 5 and is_transport_error(err.value)


def test_abort_wakes_a_reader_blocked_without_a_limit():
    router, peers = pair()
    errors = []

    def reader():
        try:
            peers[1].recv([torch.empty(4)], 0, 0).wait()
        except RuntimeError as exc:
            errors.append(exc)
    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.2)
    peers[1].abort()
    t.join(5)
    assert not t.is_alive() and errors and is_transport_error(errors[0])


def test_an_actor_of_an_older_group_cannot_join():
    listener = Listener("127.0.0.1")
    address, old_key, key = listener.address, new_key(), new_key()
    stale_errors = []

    def stale():  # generation 1 with its key, while the router forms 2
        try:
            SocketGroup.connect(address, old_key, 1, 1, 5.0, DAY, 5.0)
        except (OSError, RuntimeError) as exc:
            stale_errors.append(exc)
    t = threading.Thread(target=stale)
    t.start()
    with pytest.raises(RuntimeError, match=r"Timed out .* ranks \[1\]"):
        SocketGroup.accept(listener, key, 2, 2, 0.5, DAY, 5.0)
    t.join(5)
    assert stale_errors, "the stale actor's connection should have been refused"
    fresh = threading.Thread(target=lambda: SocketGroup.connect(address, key, 2, 1, 5.0, DAY, 5.0))
    fresh.start()
    router = SocketGroup.accept(listener, key, 2, 2, 5.0, DAY, 5.0)
    fresh.join()
    assert set(router.conns) == {1} and router.refused == 0
    listener.close()


def test_host_tensors_only():
    router, _ = pair()
    with pytest.raises(ValueError, match="contiguous host tensors"):
        router.send([torch.randn(4, 4).t()], 1, 0)


@pytest.mark.parametrize("same_host", [True, False], ids=["unix", "tcp"])
def test_a_polling_reader_gets_the_same_bytes_and_the_same_failures(same_host):
    """The router polls for replies before it sleeps (spin_s): a reply arriving in pieces, during
    the poll or after it, reads whole; a silent peer still times out; a closed one still fails."""
    router, peers = pair(world=3, same_host=same_host)
    assert router.local == ({1, 2} if same_host else set())  # the Unix socket's ranks: this host's
    router.spin_s = 0.002
    big = torch.randint(0, 255, (2_000_000,), dtype=torch.uint8)  # more than one socket buffer

    def reply(rank, delay):
        time.sleep(delay)
        peers[rank].send([big[:1000]], 0, 0)
        time.sleep(delay)  # the rest after a pause: the poll may end in the middle of the message
        peers[rank].send([big[1000:]], 0, 0)
    for delay in (0.0, 0.001, 0.01):
        t = threading.Thread(target=reply, args=(1, delay))
        t.start()
        got = torch.empty_like(big)
        router.recv([got], 1, 0).wait(datetime.timedelta(seconds=5))
        t.join(5)
        assert torch.equal(got, big)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="Timed out") as err:
        router.recv([torch.empty(4)], 2, 0).wait(datetime.timedelta(seconds=0.3))
    assert 0.25 < time.monotonic() - t0 < 5 and is_transport_error(err.value)
    peers[1].abort()
    with pytest.raises(RuntimeError, match="Connection closed") as err:
        router.recv([torch.empty(4)], 1, 0).wait(datetime.timedelta(seconds=30))
    assert is_transport_error(err.value)
