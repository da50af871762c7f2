"""Helpers for tests that start `expertmesh serve` in its own process."""

from __future__ import annotations

import socket
import subprocess
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
