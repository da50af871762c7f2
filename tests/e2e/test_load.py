"""32 concurrent streaming clients for 60 s: each request completes or is refused by design."""

import os
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import KEYS

pytestmark = [pytest.mark.ray, pytest.mark.e2e]
SECONDS = float(os.environ.get("EXPERTMESH_LOAD_SECONDS", "60"))


def server_rss() -> int:
    """Resident bytes of the serving processes: the Serve replica and the router actor."""
    total = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().decode(errors="ignore")
            if "ray::ServeReplica:expertmesh" in cmd or cmd.startswith("ray::Router"):
                rss = [ln for ln in (proc / "status").read_text().splitlines() if ln.startswith("VmRSS")]
                total += int(rss[0].split()[1]) * 1024
        except OSError:
            continue
    return total


def stream_once(url: str, tenant: str, n: int) -> str:
    body = {"model": "expertmesh", "prompt": f"request {n}: tell me more", "max_tokens": 8 + n % 24,
            "temperature": 0.7, "seed": n, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEYS[tenant]}"}) as r:
        if r.status_code != 200:
            r.read()
            return str(r.status_code)
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    return "complete" if lines and lines[-1] == "data: [DONE]" and '"finish_reason": "' in lines[-2] else "broken"


def test_32_streaming_clients(server):
    for i in range(4):  # warm up, then take the memory baseline
        stream_once(server, "acme", i)
    before = server_rss()
    outcomes: Counter = Counter()
    lock = threading.Lock()
    stop = time.time() + SECONDS

    def client(k: int) -> None:
        n = 0
        while time.time() < stop:
            res = stream_once(server, "acme" if k % 2 else "globex", k * 10_000 + n)
            with lock:
                outcomes[res] += 1
            n += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = server_rss()
    print(f"outcomes {dict(outcomes)}; serving RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB")
    assert set(outcomes) <= {"complete", "429", "503"}, outcomes
    assert outcomes["complete"] >= 32
    assert after < before * 1.10, f"memory grew {before / 2**20:.0f} -> {after / 2**20:.0f} MiB"
