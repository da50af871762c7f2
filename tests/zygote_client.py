"""What the test cluster's raylet runs in place of Ray's setup_worker.py (tests/zygote.py): ask
the zygote to fork a worker that has already imported Ray, torch and expertmesh, then stand for
it until it exits (the raylet watches this process; a signal to it goes to the worker, the
worker's exit status becomes this process's).

Only the standard library here: this runs once per Ray worker. Anything the zygote cannot take
(another language, a runtime env with a command prefix or its own interpreter, no zygote
listening) runs Ray's own setup_worker.py, unchanged.
"""

import array
import json
import os
import signal
import socket
import sys


def ray_setup_worker() -> None:
    import importlib.util

    ray_dir = importlib.util.find_spec("ray").submodule_search_locations[0]  # located, not imported
    setup = os.path.join(ray_dir, "_private", "workers", "setup_worker.py")
    os.execv(sys.executable, [sys.executable, setup, *sys.argv[1:]])


def main() -> None:
    path = os.environ.get("EXPERTMESH_TEST_ZYGOTE")
    args = sys.argv[1:]
    language = next((a.split("=", 1)[1] for a in args if a.startswith("--language=")), "PYTHON")
    context = next((a.split("=", 1)[1] for a in args if a.startswith("--serialized-runtime-env-context=")), "{}")
    ctx = json.loads(context or "{}")
    plain = (language == "PYTHON" and not ctx.get("command_prefix") and not ctx.get("java_jars")
             and ctx.get("py_executable") in (None, sys.executable) and not ctx.get("override_worker_entrypoint"))
    try:  # a worker of a host in another network namespace (tests/hosts/) is started there, as Ray starts it
        here = os.readlink("/proc/self/ns/net") == os.environ.get("EXPERTMESH_TEST_ZYGOTE_NETNS")
    except OSError:
        here = False
    if not path or not plain or not here:
        return ray_setup_worker()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        return ray_setup_worker()
    head = json.dumps({"argv": args, "cwd": os.getcwd(), "env": dict(os.environ), "client": os.getpid()}).encode()
    sock.sendmsg([len(head).to_bytes(4, "big") + head],
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
    reader = sock.makefile("r")
    child = int(json.loads(reader.readline())["pid"])

    def forward(signum, _frame):
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, forward)
    line = reader.readline()
    status = json.loads(line)["status"] if line else 1 << 8
    if os.WIFSIGNALED(status):  # die as the worker died (a SIGKILL stays a SIGKILL)
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


if __name__ == "__main__":
    main()
