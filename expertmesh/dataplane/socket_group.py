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

Joining: an actor's connection counts as its rank only after the handshake of handshake.py
(both ends prove they hold the generation's key, handed out through Ray); the router runs
the handshakes of a formation side by side and closes any connection that fails, stalls or
claims a taken rank. Nothing on these connections is unpickled (wire.py), and every receive
has a size its reader chose from the plan, never one a peer sent unchecked.

Failure: a dead peer's connection closes (reads return nothing: "Connection closed by peer");
an operation past its timeout raises "Timed out" and closes the connection (as gloo closes the
pair); `abort` shuts every connection down, which wakes a thread blocked on one. The error
texts are those `collective.is_transport_error` knows.
"""

from __future__ import annotations

import datetime
import logging
import selectors
import socket
import time
import uuid
from typing import Callable

import torch

from expertmesh.dataplane.handshake import (
    HANDSHAKE_TIMEOUT_S,
    PendingJoin,
    Refused,
    join,
)

MAX_PENDING = 64  # handshakes in progress at once (more: the oldest is dropped)
CHECK_S = 0.5  # while ranks are missing, how often the caller's check runs
MAX_REFUSALS_LOGGED = 20  # per group formation; the rest are counted
log = logging.getLogger("expertmesh.dataplane")


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
        self.refused = 0  # connections refused while this group formed (rank 0)
        self.left_out: set[int] = set()  # ranks the formation stopped waiting for (rank 0)
        self.wait_timeout, self.send_timeout_s = wait_timeout, send_timeout_s
        self._timeouts: dict[int, float | None] = {}
        self.local: set[int] = set()  # ranks connected over the Unix socket: on this host (rank 0)
        self.spin_s = 0.0  # how long a read polls before it sleeps (0: sleeps at once; see `_read`)

    # -- forming ----------------------------------------------------------------------------
    @classmethod
    def accept(cls, listener: "Listener", key: bytes, generation: int, world: int, timeout_s: float,
               wait_timeout: datetime.timedelta, send_timeout_s: float,
               check: "Callable[[set[int]], set[int] | None] | None" = None) -> "SocketGroup":
        """Rank 0: wait until every rank 1 .. world-1 of this generation has connected and
        proved it holds the generation's key (handshake.py). Handshakes run side by side,
        driven by readiness: a connection that stalls, fails its proof or claims a rank
        already taken is closed and logged, and never delays or displaces a member.
        check(missing ranks), called about every CHECK_S while waiting (the router asks Ray
        about the missing actors rather than sit out the timeout), raises to stop waiting, or
        returns ranks not to wait for (the group forms without them: `left_out`)."""
        conns: dict[int, socket.socket] = {}
        pending: dict[socket.socket, PendingJoin] = {}
        local: set[socket.socket] = set()  # taken from the Unix socket
        deadline = time.monotonic() + timeout_s
        refused, checked = 0, time.monotonic()
        expected = set(range(1, world))
        try:
            while expected - set(conns):
                now = time.monotonic()
                if now >= deadline:
                    raise RuntimeError(f"Timed out after {timeout_s:g} s waiting for ranks "
                                       f"{sorted(expected - set(conns))} to connect")
                if check is not None and now - checked >= CHECK_S:
                    expected -= check(expected - set(conns)) or set()
                    checked = now
                    continue
                for conn, p in list(pending.items()):  # stalled handshakes
                    if now >= p.deadline:
                        refused += _refuse(pending.pop(conn), "no complete handshake within "
                                                              f"{HANDSHAKE_TIMEOUT_S:g} s", refused)
                wake = min([deadline, *(p.deadline for p in pending.values())]) - now
                if check is not None:
                    wake = min(wake, CHECK_S)
                ready = listener.ready([*pending], max(wake, 0.0))
                for sock in ready:
                    if sock in pending:
                        p = pending[sock]
                        try:
                            rank = p.advance(conns)
                        except Refused as exc:
                            refused += _refuse(pending.pop(sock), str(exc), refused)
                            continue
                        if rank is not None:
                            del pending[sock]
                            sock.setblocking(True)
                            _tune(sock)
                            conns[rank] = sock
                        continue
                    conn = listener.take(sock)
                    if conn is None:
                        continue
                    if sock is listener.unix:
                        local.add(conn)
                    if len(pending) >= MAX_PENDING:  # a flood of connections: the oldest handshake goes
                        oldest = min(pending.values(), key=lambda q: q.deadline)
                        refused += _refuse(pending.pop(oldest.conn), "too many handshakes at once", refused)
                    pending[conn] = PendingJoin(conn, key, generation, world, time.monotonic() + HANDSHAKE_TIMEOUT_S)
            for conn in list(pending):  # still proving itself when every member had joined: refused, and counted
                refused += _refuse(pending.pop(conn), "the group formed without it (every rank had joined)", refused)
        except BaseException:
            for c in conns.values():
                c.close()
            raise
        finally:
            for p in pending.values():
                p.conn.close()
        for rank in set(conns) - expected:  # left out, then connected after all: not a member
            conns.pop(rank).close()
        group = cls(0, conns, wait_timeout, send_timeout_s)
        group.local = {rank for rank, c in conns.items() if c in local}
        group.refused = refused
        group.left_out = set(range(1, world)) - expected
        return group

    @classmethod
    def connect(cls, address: tuple, key: bytes, generation: int, rank: int, timeout_s: float,
                wait_timeout: datetime.timedelta, send_timeout_s: float, same_host: bool = False) -> "SocketGroup":
        """Rank > 0: connect to the router (`Listener.address`; over its Unix socket when on
        the router's host) and prove this is the actor of `rank` (handshake.py)."""
        host, port, unix = tuple(address)
        if same_host and unix:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.settimeout(timeout_s)
            conn.connect("\0" + unix)
        else:
            conn = socket.create_connection((host, port), timeout=timeout_s)
        try:
            conn.settimeout(min(timeout_s, HANDSHAKE_TIMEOUT_S))
            join(conn, key, generation, rank)
        except BaseException:
            conn.close()
            raise
        _tune(conn)
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

    def close_peer(self, rank: int) -> None:
        """End one connection (its peer sent a malformed message); the others stay."""
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
            if self.spin_s:
                view = view[_poll_into(conn, view, self.spin_s, seconds):]
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

    def ready(self, others: list[socket.socket], timeout_s: float) -> list[socket.socket]:
        """The listening sockets with a connection waiting, and the `others` with bytes to read."""
        with selectors.DefaultSelector() as sel:  # epoll: no limit on descriptor numbers, unlike select()
            for s in (self.tcp, self.unix, *others):
                if s is not None:
                    sel.register(s, selectors.EVENT_READ)
            return [key.fileobj for key, _ in sel.select(timeout_s)]

    def take(self, sock: socket.socket) -> socket.socket | None:
        """The waiting connection on a listening socket `ready` returned (None if it went)."""
        if sock is not self.tcp and sock is not self.unix:
            return None
        try:
            conn, _ = sock.accept()
        except OSError:
            return None
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


def _poll_into(conn: socket.socket, view: memoryview, spin_s: float, timeout_s: float | None) -> int:
    """Read without sleeping for up to spin_s (then the caller's blocking read takes the rest);
    returns the bytes read. A reader that sleeps is woken by the sender's kernel, which costs
    ~30-70 us a message on a virtual machine's cores (measured: round trip with 100 us of work
    on each side 185 us sleeping, 114 us polling); the router polls for replies that come
    soon, where its host has a core for it (collective.py)."""
    got, n = 0, len(view)
    conn.settimeout(0.0)  # non-blocking: a read with nothing there returns at once
    try:
        end = time.perf_counter() + spin_s
        while got < n and time.perf_counter() < end:
            try:
                k = conn.recv_into(view[got:])
            except BlockingIOError:
                continue
            if k == 0:
                raise RuntimeError("the connection closed")
            got += k
    finally:
        conn.settimeout(timeout_s)
    return got


def _read_into(conn: socket.socket, view: memoryview) -> None:
    got, n = 0, len(view)
    while got < n:
        k = conn.recv_into(view[got:])
        if k == 0:
            raise RuntimeError("the connection closed")
        got += k


def _refuse(p: PendingJoin, why: str, refused: int) -> int:
    """Close a connection that did not join; log it (the first few of a formation). Returns 1."""
    try:
        peer = p.conn.getpeername() or "a process on this host"
    except OSError:
        peer = "?"
    if refused < MAX_REFUSALS_LOGGED:
        log.warning("data plane: refused a connection from %s to generation %d: %s", peer, p.generation, why)
    elif refused == MAX_REFUSALS_LOGGED:
        log.warning("data plane: more connections refused during this formation; not logging each")
    p.conn.close()
    return 1
