"""Stopping `expertmesh serve` the way a terminal (Ctrl-C: SIGINT to the foreground process
group) or a container runtime (SIGTERM to the group) does: a stream in flight finishes, the
server exits within seconds and leaves no Ray process behind.

The server starts its own local Ray cluster here (no --address), in its own process group, so
the signal reaches exactly what a terminal's would.
"""

import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.serving import free_port, wait_healthy

pytestmark = [pytest.mark.ray, pytest.mark.e2e]
EXIT_BOUND_S = 30.0


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, session id) of a live process, None if gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else (int(fields[1]), int(fields[3]))


def _processes() -> dict[int, tuple[int, int]]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            out[int(entry)] = st
    return out


def _descendants(pid: int) -> set[int]:
    procs, found, todo = _processes(), set(), [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, _) in procs.items():
            if ppid == parent and child not in found:
                found.add(child)
                todo.append(child)
    return found


def test_signal_to_the_process_group_drains_and_exits(tmp_path):
    """SIGINT (a terminal's Ctrl-C) to one server, SIGTERM (a container runtime's stop) to
    another, both at once (each on its own cluster: the two cost about one server's start)."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(drain_and_exit, sig, tmp_path / sig.name) for sig in (signal.SIGINT, signal.SIGTERM)]
        for run in runs:
            run.result()


def drain_and_exit(sig: signal.Signals, tmp_path: Path) -> None:
    tmp_path.mkdir()
    port = free_port()
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    proc = subprocess.Popen([sys.executable, "-m", "expertmesh.cli", "serve", "--port", str(port),
                             "--context-shards", "1", "--expert-groups", "1"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(env, PYTHONWARNINGS="ignore"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log, timeout_s=180, poll_s=0.5)
        ray_processes = _descendants(proc.pid)
        sessions = {sid for p, (_, sid) in _processes().items() if p in ray_processes}
        assert ray_processes, "the server's processes were not found"

        streamed: dict = {}

        def stream() -> None:  # a request in flight when the signal comes
            with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                              json={"model": "expertmesh", "prompt": "Once upon a time", "max_tokens": 200,
                                    "temperature": 0, "stream": True}) as r:
                streamed["status"] = r.status_code
                streamed["events"] = [line for line in r.iter_lines() if line.startswith("data:")]

        reader = threading.Thread(target=stream)
        reader.start()
        time.sleep(0.5)
        t0 = time.perf_counter()
        os.killpg(proc.pid, sig)
        proc.wait(timeout=EXIT_BOUND_S + 30)
        took = time.perf_counter() - t0
        reader.join(30)
        print(f"\n{sig.name} to the process group: exited in {took:.1f} s; "
              f"{len(streamed.get('events', []))} stream events delivered")
        print("\n".join(line for line in log.read_text().splitlines() if line.startswith("expertmesh:")))
        assert took < EXIT_BOUND_S, log.read_text()[-3000:]
        assert streamed.get("status") == 200 and streamed["events"][-1] == "data: [DONE]"
        time.sleep(1)
        left = {p for p, (_, sid) in _processes().items() if p in ray_processes or sid in sessions}
        assert not left, f"processes left behind: {left}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
