"""Point-to-point messages over TCP sockets: the collective data plane's transport on CPU hosts.

The data plane's messages all run between the router (rank 0) and one actor, and both sides
always know each message's size (collective.py). So a star of plain TCP connections carries
them: `send` writes the tensor's bytes, `recv` reads exactly as many into the tensor. This has
the surface of a torch.distributed process group's point-to-point calls (`send` / `recv`
returning a work with `wait(timeout)`, `abort`), so the exchange code is the same over gloo,
NCCL or this.

Why not gloo on CPUs: gloo hands every message from its I/O thread to the waiting thread, and
a fan-out to four actors took 330-400 us per round trip on the 2-core development machine,
against 50-65 us over these sockets (a blocked `recv_into` wakes the waiting thread itself;
both measured with the same 256-byte messages). On a per-layer exchange that is most of a
small decode step.

Sends write synchronously and block while the peer's buffer is full. The plane's order makes
that safe: an actor only writes a reply after reading the whole request, and the router reads
the replies of a phase before it writes the next phase's requests, so no two writers wait on
each other.

Failure: a dead peer's connection closes (reads return nothing: "Connection closed by peer");
an operation past its timeout raises "Timed out" and closes the connection (as gloo closes the
pair); `abort` shuts every connection down, which wakes a thread blocked on one. The error
texts are those `collective.is_transport_error` knows.
"""

from __future__ import annotations

import datetime
import select
import socket
import struct
import time
import uuid

import torch

_HELLO = struct.Struct("<qq")  # generation, rank: the first bytes an actor sends on its connection


class _Done:
    """A send: written when `send` returned."""

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        return True


class _Recv:
    """A receive: the bytes are read when the caller waits for them."""

    def __init__(self, group: "SocketGroup", peer: int, view: memoryview) -> None:
        self.group, self.peer, self.view = group, peer, view

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        self.group._read(self.peer, self.view, timeout)
        return True


def _bytes(t: torch.Tensor) -> memoryview:
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("the socket transport moves contiguous host tensors only")
    return memoryview(t.numpy()).cast("B")


def _seconds(timeout: datetime.timedelta | None) -> float | None:
    return None if timeout is None else timeout.total_seconds()


class SocketGroup:
    """This process's connections: the router holds one per actor, an actor one to the router."""

    def __init__(self, rank: int, conns: dict[int, socket.socket], wait_timeout: datetime.timedelta,
                 send_timeout_s: float) -> None:
        """wait_timeout: how long a receive waits when its caller names no limit (as a process
        group's default timeout); send_timeout_s: how long a send may block on a peer that
        does not read."""
        self.rank, self.conns = rank, conns
        self.wait_timeout, self.send_timeout_s = wait_timeout, send_timeout_s
        self._timeouts: dict[int, float | None] = {}

    # -- forming ----------------------------------------------------------------------------
    @classmethod
    def accept(cls, listener: "Listener", generation: int, world: int, timeout_s: float,
               wait_timeout: datetime.timedelta, send_timeout_s: float) -> "SocketGroup":
        """Rank 0: wait until every rank 1 .. world-1 of this generation has connected."""
        conns: dict[int, socket.socket] = {}
        deadline = time.monotonic() + timeout_s
        try:
            while len(conns) < world - 1:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"Timed out after {timeout_s:g} s waiting for ranks "
                                       f"{sorted(set(range(1, world)) - set(conns))} to connect")
                conn = listener.accept(left)
                if conn is None:
                    continue
                conn.settimeout(left)
                try:
                    gen, rank = _HELLO.unpack(_read_exact(conn, _HELLO.size))
                except (OSError, RuntimeError):
                    conn.close()
                    continue
                if gen != generation or not 0 < rank < world or rank in conns:  # a late actor of an older group
                    conn.close()
                    continue
                _tune(conn)
                conns[rank] = conn
        except BaseException:
            for c in conns.values():
                c.close()
            raise
        return cls(0, conns, wait_timeout, send_timeout_s)

    @classmethod
    def connect(cls, address: tuple, generation: int, rank: int, timeout_s: float,
                wait_timeout: datetime.timedelta, send_timeout_s: float, same_host: bool = False) -> "SocketGroup":
        """Rank > 0: connect to the router (`Listener.address`; over its Unix socket when on
        the router's host) and say who this is."""
        host, port, unix = tuple(address)
        if same_host and unix:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.settimeout(timeout_s)
            conn.connect("\0" + unix)
        else:
            conn = socket.create_connection((host, port), timeout=timeout_s)
        _tune(conn)
        conn.sendall(_HELLO.pack(generation, rank))
        return cls(rank, {0: conn}, wait_timeout, send_timeout_s)

    # -- point to point ---------------------------------------------------------------------
    def send(self, tensors: list[torch.Tensor], dst: int, tag: int = 0) -> _Done:
        """Write the tensors' bytes back to back (one system call for small messages)."""
        conn = self._conn(dst)
        self._set_timeout(dst, conn, self.send_timeout_s)
        try:
            _write(conn, [_bytes(t) for t in tensors])
        except TimeoutError:
            self._close(dst)
            raise RuntimeError(f"Timed out sending to rank {dst}") from None
        except OSError as exc:
            self._close(dst)
            raise RuntimeError(f"Connection closed by peer (rank {dst}): {exc}") from None
        return _Done()

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int = 0) -> _Recv:
        (t,) = tensors
        return _Recv(self, src, _bytes(t))

    def abort(self) -> None:
        for rank in list(self.conns):
            self._close(rank)

    # -- internals --------------------------------------------------------------------------
    def _conn(self, rank: int) -> socket.socket:
        conn = self.conns.get(rank)
        if conn is None:
            raise RuntimeError(f"Connection closed: no connection to rank {rank} (the group was aborted)")
        return conn

    def _set_timeout(self, rank: int, conn: socket.socket, seconds: float | None) -> None:
        if self._timeouts.get(rank, -1.0) != seconds:
            conn.settimeout(seconds)
            self._timeouts[rank] = seconds

    def _read(self, rank: int, view: memoryview, timeout: datetime.timedelta | None) -> None:
        conn = self._conn(rank)
        seconds = _seconds(timeout if timeout is not None else self.wait_timeout)
        self._set_timeout(rank, conn, seconds)
        try:
            _read_into(conn, view)
        except TimeoutError:
            self._close(rank)
            raise RuntimeError(f"Timed out waiting {seconds:g} s for a message from rank {rank}") from None
        except (OSError, RuntimeError) as exc:
            self._close(rank)
            raise RuntimeError(f"Connection closed by peer (rank {rank}): {exc}") from None

    def _close(self, rank: int) -> None:
        conn = self.conns.pop(rank, None)
        if conn is not None:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked on it
            except OSError:
                pass
            conn.close()


def _tune(conn: socket.socket) -> None:
    if conn.family != socket.AF_UNIX:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small messages leave at once


class Listener:
    """The router's listening sockets: TCP for actors on other hosts, and a Unix socket in
    Linux's abstract namespace (no file; gone with the process) for actors on the router's
    host, where a round trip costs less. `address` = (host, port, unix name or "")."""

    def __init__(self, host: str) -> None:
        self.tcp = socket.create_server((host, 0), backlog=128)
        self.unix: socket.socket | None = None
        name = f"expertmesh-{uuid.uuid4().hex}"
        try:
            unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            unix.bind("\0" + name)
            unix.listen(128)
            self.unix = unix
        except OSError:  # no abstract namespace here (not Linux): TCP only
            name = ""
        self.address = (host, self.tcp.getsockname()[1], name)

    def accept(self, timeout_s: float) -> socket.socket | None:
        """A new connection on either socket, or None after timeout_s."""
        ready, _, _ = select.select([s for s in (self.tcp, self.unix) if s is not None], [], [], timeout_s)
        if not ready:
            return None
        conn, _ = ready[0].accept()
        return conn

    def close(self) -> None:
        for s in (self.tcp, self.unix):
            if s is not None:
                s.close()


def _write(conn: socket.socket, views: list[memoryview]) -> None:
    while views:
        n = conn.sendmsg(views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]


def _read_into(conn: socket.socket, view: memoryview) -> None:
    got, n = 0, len(view)
    while got < n:
        k = conn.recv_into(view[got:])
        if k == 0:
            raise RuntimeError("the connection closed")
        got += k


def _read_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _read_into(conn, memoryview(buf))
    return bytes(buf)
