"""A fork server for the test session's Ray workers.

Every Ray actor of a mesh is a new Python process that imports Ray, torch and expertmesh
(~2-2.7 CPU-seconds here, before it does anything); the suite starts hundreds of them on two
cores. The zygote imports those once and forks a worker per request: the session cluster's
raylet runs `tests/zygote_client.py` instead of Ray's `setup_worker.py`, and the client asks
the zygote for a child that runs Ray's `default_worker.py` with the client's arguments,
environment, working directory and standard streams. The client stands in for the worker
towards the raylet: a signal to it is forwarded, the worker's exit (a SIGKILL included) becomes
its own, and a worker whose client dies is killed by the zygote at once (as the raylet's SIGKILL
would have ended it: a worker left running a moment longer still answers on the data plane).

Nothing changes for Ray but how the process got its modules: the same `default_worker.py`, the
same arguments, the same registration. Clusters the tests start themselves (`ray start` in
network namespaces, `ray.cluster_utils.Cluster`, `expertmesh serve`'s own) start their workers
as Ray does. The zygote imports no BLAS with threads (OPENBLAS_NUM_THREADS=1 before numpy), starts no
thread before it forks, and does not import Ray (a child forked after Ray's C++ core was loaded
cannot reach the GCS): the children import Ray themselves.
"""

from __future__ import annotations

import array
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# torch is most of a worker's start; Ray itself is not preloaded: a child forked after
# `import ray` (its C++ core loaded) cannot reach the GCS
PRELOAD = ("numpy", "torch", "safetensors.torch", "torch._dynamo", "sympy", "psutil", "requests", "jsonschema", "yaml",
           "msgpack", "pydantic", "filelock", "pyarrow")


def start(path: Path) -> subprocess.Popen:
    """Start the zygote listening on `path`; returns once it listens."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, __file__, str(path)], env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the worker zygote did not start (exit {proc.poll()})")
        time.sleep(0.05)
    return proc


def install(path: Path) -> None:
    """Make the next local cluster's raylet start workers through the zygote at `path`."""
    from ray._private import ray_constants

    client = str(Path(__file__).with_name("zygote_client.py"))
    os.environ["EXPERTMESH_TEST_ZYGOTE"] = str(path)
    os.environ["EXPERTMESH_TEST_ZYGOTE_CLIENT"] = client
    os.environ["EXPERTMESH_TEST_ZYGOTE_NETNS"] = os.readlink("/proc/self/ns/net")
    ray_constants.SETUP_WORKER_FILENAME = client  # joined to Ray's workers folder: an absolute path wins
    # the clusters the session's subprocesses start (tests/zygote_site/sitecustomize.py)
    site = str(Path(__file__).with_name("zygote_site"))
    os.environ["PYTHONPATH"] = os.pathsep.join([site, *filter(None, [os.environ.get("PYTHONPATH")])])


def _recv(conn: socket.socket) -> tuple[dict, list[int]]:
    fds = array.array("i")
    data, ancdata, _, _ = conn.recvmsg(1 << 20, socket.CMSG_LEN(3 * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    size = int.from_bytes(data[:4], "big")
    body = data[4:]
    while len(body) < size:
        more = conn.recv(size - len(body))
        if not more:
            raise ConnectionError("the client left mid-request")
        body += more
    return json.loads(body), list(fds)


def _child(conn: socket.socket, listener: socket.socket, wake: int, others: list[socket.socket], head: dict,
           fds: list[int]) -> None:
    """In the forked child: become the worker the client was started as."""
    code = 1
    try:
        listener.close()
        for other in others:  # the other workers' clients
            other.close()
        os.close(wake)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()  # a session and process group of its own: Ray kills a worker's group when it ends it
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(head["cwd"])
        os.environ.clear()
        os.environ.update(head["env"])
        args = list(head["argv"])
        context = next((a.split("=", 1)[1] for a in args if a.startswith("--serialized-runtime-env-context=")),
                       "{}")
        args = [a for a in args if not a.startswith(("--serialized-runtime-env-context=", "--language="))]
        from ray._private.runtime_env.context import RuntimeEnvContext
        from ray._private.utils import update_envs

        update_envs(RuntimeEnvContext.deserialize(context or "{}").env_vars)  # what setup_worker.py applies
        _watch(head["client"], conn)
        import runpy

        sys.argv = args
        sys.path.insert(0, os.path.dirname(os.path.abspath(args[0])))  # as `python default_worker.py` has it
        runpy.run_path(args[0], run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - the worker failed to start: say why where the raylet logs it
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def _watch(client: int, conn: socket.socket) -> None:
    """Exit when the client (the process the raylet started and watches) is gone."""
    import threading

    pidfd = os.pidfd_open(client)
    conn.close()

    def wait() -> None:
        select.select([pidfd], [], [])
        os._exit(1)

    threading.Thread(target=wait, name="zygote-client-watch", daemon=True).start()


def serve(path: Path) -> None:
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:
            pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    listener.bind(str(tmp))
    listener.listen(64)
    rd, wake = os.pipe()
    os.set_blocking(wake, False)
    signal.set_wakeup_fd(wake)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    os.rename(tmp, path)  # listening: start() sees the path
    clients: dict[int, socket.socket] = {}
    watched: dict[int, int] = {}  # a client's pidfd -> its worker
    parent = os.getppid()
    while True:
        ready, _, _ = select.select([listener, rd, *watched], [], [], 1.0)
        if os.getppid() != parent:  # the test session is gone
            break
        if rd in ready:
            os.read(rd, 4096)
        for pidfd in [fd for fd in ready if fd in watched]:  # a client the raylet killed: its worker now,
            try:  # not when the worker's own watch thread gets the GIL (it may serve a step meanwhile)
                os.kill(watched.pop(pidfd), signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.close(pidfd)
        while clients:  # reap every finished worker, tell its client how it ended
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            for pidfd in [fd for fd, worker in watched.items() if worker == pid]:
                del watched[pidfd]
                os.close(pidfd)
            conn = clients.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(json.dumps({"status": status}).encode() + b"\n")
                except OSError:
                    pass
                conn.close()
        if listener in ready:
            conn, _ = listener.accept()
            try:
                head, fds = _recv(conn)
            except (OSError, ValueError, ConnectionError):
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:
                for pidfd in watched:
                    os.close(pidfd)
                _child(conn, listener, wake, list(clients.values()), head, fds)
            for fd in fds:
                os.close(fd)
            clients[pid] = conn
            try:
                watched[os.pidfd_open(head["client"])] = pid
            except (OSError, KeyError):  # the client is gone already: its worker's own watch ends it
                pass
            try:
                conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            except OSError:
                pass


if __name__ == "__main__":
    sys.path.pop(0)  # this file's folder (tests/): its `jax` package would shadow JAX in every worker
    serve(Path(sys.argv[1]))
