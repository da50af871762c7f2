"""A running mesh's data plane, attacked as a stranger on the network would (raw sockets, the
router's real ports): a process that knows the port, the next generation and an actor's rank
is refused before and after that actor restarts; the restarted actor joins; the answers stay
the same; no code runs in the router and no plan or token rows leave it. A storm of malformed
handshakes during a re-formation leaves the router, the actors and every request intact."""

import os
import pickle
import random
import secrets
import socket
import threading
import time

import pytest
import ray

import expertmesh as em
from expertmesh.dataplane.handshake import HELLO, MAGIC, NONCE, VERSION
from expertmesh.engine.request import Request
from expertmesh.model.sampling import SamplingParams
from tests.conftest import VOCAB

pytestmark = pytest.mark.ray


def ids(n, seed):
    return random.Random(seed).choices(range(VOCAB), k=n)


def plane(mesh):
    return ray.get(mesh.router.stats.remote())


def kill_and_wait(handle):
    pid = ray.get(handle.__ray_call__.remote(lambda self: os.getpid()))
    ray.kill(handle, no_restart=False)
    gone_by = time.monotonic() + 30
    while time.monotonic() < gone_by and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.01)
    assert not os.path.exists(f"/proc/{pid}")


class Stranger(threading.Thread):
    """Connects to the router's data plane, claims `rank` of `generation`, answers the challenge
    with a forged proof and a pickle that would create `marker` if anyone loaded it, and keeps
    everything the router sends it."""

    def __init__(self, address, generation, rank, marker, unix=False):
        super().__init__(daemon=True)
        host, port, name = address
        if unix:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect("\0" + name)
        else:
            self.sock = socket.create_connection((host, port))
        self.sock.settimeout(120)
        self.sock.sendall(HELLO.pack(MAGIC, VERSION, generation, rank, secrets.token_bytes(NONCE)))
        self.marker, self.received, self.closed = marker, b"", False

    def run(self):
        class Exploit:
            def __reduce__(self_):
                return (open, (str(self.marker), "w"))
        try:
            self.received = self.sock.recv(NONCE)
            self.sock.sendall(os.urandom(32) + pickle.dumps(Exploit()) * 50)
            while chunk := self.sock.recv(65536):
                self.received += chunk
            self.closed = True
        except OSError:
            self.closed = True


def test_a_stranger_cannot_take_a_restarted_actors_place(ray_cluster, tiny_checkpoint, tmp_path):
    mesh = em.Mesh.start(tiny_checkpoint("mixtral"), context_shards=2, expert_groups=2, page_size=16,
                         store=str(tmp_path / "store"))  # a restarted shard reopens the context
    try:
        ctx = mesh.register_context(ids(70, 1), mode="exact")
        prompt = ids(6, 2)
        want = mesh.generate(prompt, context_id=ctx.id, max_new_tokens=10).token_ids
        # ranks: shards 1, 2, expert groups 3, 4; each round a stranger claims the rank of the
        # actor about to die, for the generation its restart forms, before it dies
        for round_, (victim, rank, unix) in enumerate([(mesh.groups[1], 4, False), (mesh.shards[0], 1, True)]):
            st = plane(mesh)
            assert st["transport"] == "socket"
            marker = tmp_path / f"ran-{round_}"
            stranger = Stranger(st["data_plane_address"], st["generation"] + 1, rank, marker, unix)
            stranger.start()
            kill_and_wait(victim)
            t0 = time.monotonic()
            got = mesh.generate(prompt, context_id=ctx.id, max_new_tokens=10).token_ids
            took = time.monotonic() - t0
            assert got == want, f"round {round_}: the answer changed after the restart"
            stranger.join(30)
            after = plane(mesh)
            assert after["generation"] > st["generation"] and after["data_plane_refused"] > st["data_plane_refused"]
            assert stranger.closed and len(stranger.received) <= NONCE, \
                f"the router sent a stranger {len(stranger.received)} bytes"
            assert not marker.exists(), "code sent by a stranger ran"
            assert took < 60
        assert mesh.generate(prompt, context_id=ctx.id, max_new_tokens=10).token_ids == want
    finally:
        mesh.shutdown()


def junk_handshakes(address, generation, n, seed):
    """Random, truncated, oversized, wrong-generation and replayed hellos, over TCP and Unix."""
    rng = random.Random(seed)
    host, port, name = address
    replay = HELLO.pack(MAGIC, VERSION, generation, 1, secrets.token_bytes(NONCE)) + os.urandom(32)
    kinds = [lambda: os.urandom(rng.randrange(1, 200)),
             lambda: HELLO.pack(MAGIC, VERSION, generation + rng.choice([1, 2, -1]), rng.randrange(1, 5),
                                secrets.token_bytes(NONCE))[:rng.randrange(10, HELLO.size + 1)],
             lambda: HELLO.pack(MAGIC, VERSION, generation + 1, rng.randrange(-3, 9), secrets.token_bytes(NONCE))
             + os.urandom(2 << 20),
             lambda: replay,
             lambda: b""]
    socks = []
    for i in range(n):
        try:
            if i % 3 == 2:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect("\0" + name)
            else:
                s = socket.create_connection((host, port), timeout=5)
            s.setblocking(False)
            try:
                s.send(rng.choice(kinds)())
            except OSError:
                pass
            socks.append(s)
        except OSError:
            pass
    return socks


def test_a_storm_of_malformed_handshakes_leaves_every_request_intact(ray_cluster, tiny_checkpoint):
    mesh = em.Mesh.start(tiny_checkpoint("olmoe"), context_shards=2, expert_groups=2, page_size=16)
    try:
        ctx = mesh.register_context(ids(90, 3), mode="exact")
        prompts = [ids(5, 10 + i) for i in range(6)]
        want = [mesh.generate(p, context_id=ctx.id, max_new_tokens=8).token_ids for p in prompts]
        rss = lambda: ray.get(mesh.router.__ray_call__.remote(  # noqa: E731
            lambda self: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")))
        before, st = rss(), plane(mesh)
        socks = junk_handshakes(st["data_plane_address"], st["generation"], 90, seed=5)
        kill_and_wait(mesh.groups[0])  # the next step forms a new group among the junk
        refs = [mesh.router.generate.remote(Request(p, ctx.id, SamplingParams(8))) for p in prompts]
        socks += junk_handshakes(st["data_plane_address"], st["generation"] + 1, 60, seed=6)
        got = [list(r.token_ids) for r in ray.get(refs, timeout=120)]
        assert got == want
        after = plane(mesh)
        assert after["data_plane_refused"] > st["data_plane_refused"]
        assert rss() - before < 64 << 20, "the router's memory grew with the junk"
        for s in socks:
            s.close()
        assert [mesh.generate(p, context_id=ctx.id, max_new_tokens=8).token_ids for p in prompts] == want
        ray.get([a.ping.remote() for a in mesh.shards + mesh.groups], timeout=30)  # every actor still answers
    finally:
        mesh.shutdown()
