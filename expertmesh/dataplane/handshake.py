"""The data plane's join handshake: a connection counts as a rank of a group only after both
ends prove they hold the group's key (a fresh secret per group generation, made by the
router and handed to each actor through Ray's control plane, never sent on the data plane).

The shape of Python's `multiprocessing.connection` challenge (random nonce, HMAC-SHA256,
`hmac.compare_digest`), in both directions and bound to the generation and rank:

    actor  -> router  HELLO  magic "EMDPJOIN", version, generation, rank, actor nonce (32 B)
    router -> actor   router nonce (32 B)
    actor  -> router  HMAC(key, "expertmesh-dp/1 actor"  + HELLO + router nonce)
    router -> actor   HMAC(key, "expertmesh-dp/1 router" + HELLO + router nonce)

A replayed proof fails (the router's nonce is new on every connection); a proof for another
rank or generation fails (both are inside HELLO); the router's proof tells the actor it
reached the router that made the key. The router reads at most HELLO + one proof from a
connection before it is admitted, never blocks on one (`PendingJoin` is driven by readiness),
and drops a connection that stalls past HANDSHAKE_TIMEOUT_S.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import struct

MAGIC = b"EMDPJOIN"
VERSION = 1
HELLO = struct.Struct("<8sHqq32s")  # magic, version, generation, rank, actor nonce
NONCE = 32
PROOF = 32  # HMAC-SHA256
HANDSHAKE_TIMEOUT_S = 5.0  # a connection that has not finished its handshake by then is closed
_ACTOR, _ROUTER = b"expertmesh-dp/1 actor", b"expertmesh-dp/1 router"


class Refused(Exception):
    """A connection that did not prove it belongs (the reason is for the router's log)."""


def new_key() -> bytes:
    """A group generation's key."""
    return secrets.token_bytes(32)


def _proof(key: bytes, label: bytes, hello: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, label + hello + nonce, hashlib.sha256).digest()


def join(conn: socket.socket, key: bytes, generation: int, rank: int) -> None:
    """The actor's side, on a blocking socket with a timeout set; raises on any failure."""
    hello = HELLO.pack(MAGIC, VERSION, generation, rank, secrets.token_bytes(NONCE))
    conn.sendall(hello)
    nonce = _recv_exact(conn, NONCE)
    conn.sendall(_proof(key, _ACTOR, hello, nonce))
    if not hmac.compare_digest(_recv_exact(conn, PROOF), _proof(key, _ROUTER, hello, nonce)):
        raise RuntimeError("Connection closed: the data-plane router did not prove the group key "
                           "(not this mesh's router)")


class PendingJoin:
    """The router's side of one connection's handshake, never blocking: `advance` reads what
    has arrived (no more than the handshake's bytes) and answers; it returns the rank once the
    actor's proof checks, None while more is to come, and raises Refused otherwise."""

    def __init__(self, conn: socket.socket, key: bytes, generation: int, world: int, deadline: float) -> None:
        conn.setblocking(False)
        self.conn, self.key, self.generation, self.world, self.deadline = conn, key, generation, world, deadline
        self.buf = bytearray()
        self.hello: bytes | None = None
        self.nonce = b""
        self.rank = -1

    def advance(self, taken: set[int] | dict) -> int | None:
        need = (HELLO.size if self.hello is None else PROOF) - len(self.buf)
        try:
            chunk = self.conn.recv(need)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            raise Refused(f"connection error during the handshake ({exc})") from None
        if not chunk:
            raise Refused("closed during the handshake")
        self.buf += chunk
        if len(self.buf) < (HELLO.size if self.hello is None else PROOF):
            return None
        if self.hello is None:
            magic, version, generation, rank, _ = HELLO.unpack(bytes(self.buf))
            if magic != MAGIC or version != VERSION:
                raise Refused("not a data-plane hello (bad magic or version)")
            if generation != self.generation:
                raise Refused(f"hello for generation {generation}; forming generation {self.generation}")
            if not 0 < rank < self.world:
                raise Refused(f"hello for rank {rank}; ranks are 1..{self.world - 1}")
            if rank in taken:
                raise Refused(f"rank {rank} is already a member")
            self.hello, self.rank, self.buf = bytes(self.buf), rank, bytearray()
            self.nonce = secrets.token_bytes(NONCE)
            self._send(self.nonce)
            return None
        if not hmac.compare_digest(bytes(self.buf), _proof(self.key, _ACTOR, self.hello, self.nonce)):
            raise Refused(f"wrong proof for rank {self.rank} (does not hold the group key)")
        if self.rank in taken:
            raise Refused(f"rank {self.rank} is already a member")
        self._send(_proof(self.key, _ROUTER, self.hello, self.nonce))
        return self.rank

    def _send(self, data: bytes) -> None:
        try:
            if self.conn.send(data) != len(data):  # a fresh connection's buffer takes 32 bytes
                raise Refused("the peer does not read")
        except OSError as exc:
            raise Refused(f"connection error during the handshake ({exc})") from None


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise RuntimeError("Connection closed by peer during the data-plane handshake")
        buf += chunk
    return bytes(buf)
