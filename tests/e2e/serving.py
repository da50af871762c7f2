"""Helpers for tests that start `expertmesh serve` in its own process."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 240, poll_s: float = 1.0) -> None:
    """Until GET /healthz answers 200; raise with the server's log if it exits or times out."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
        time.sleep(poll_s)
    raise RuntimeError(f"server not healthy within {timeout_s:g} s: {log.read_text()[-3000:]}")


@contextlib.contextmanager
def serve_process(checkpoint, log_dir: Path, *flags: str):
    """`expertmesh serve --checkpoint CHECKPOINT` on its own local Ray cluster (the session's serves
    the e2e app), healthy; yields its URL; SIGINT (then SIGKILL after 60 s) at the end."""
    port = free_port()
    log = open(log_dir / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "expertmesh.cli", "serve", "--checkpoint", str(checkpoint),
                             "--port", str(port), *flags],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log_dir / "serve.log")
        yield url
    finally:
        proc.send_signal(2)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
