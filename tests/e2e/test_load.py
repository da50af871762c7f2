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
ROLES = ("ServeController", "ProxyActor", "ServeReplica:expertmesh", "Router", "ContextShard", "ExpertGroup")


def _proc(pid: str) -> tuple[str, int, int]:
    """(command line, parent pid, resident bytes) of a process."""
    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore").strip()
    status = dict(ln.split(":", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in ln)
    return cmd, int(status["PPid"]), int(status.get("VmRSS", "0 kB").split()[0]) * 1024


def serving_processes(gcs_address: str) -> dict[int, tuple[str, int]]:
    """pid -> (process title, resident bytes) of every Ray actor process of this session's cluster
    (the children of its raylet or of the session's worker zygote; other clusters on the machine
    are not ours): the Serve controller,
    proxy and replica, the router, the context shards and the expert groups (the session's only
    live actors while this test runs), not idle pooled workers."""
    procs, children = {}, {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                children[int(proc.name)] = _proc(proc.name)
            except (OSError, KeyError, ValueError):
                continue
    raylets = {pid for pid, (cmd, _, _) in children.items()
               if "raylet" in cmd.split(" ")[0] and f"--gcs-address={gcs_address}" in cmd}
    assert raylets, f"no raylet of the cluster at {gcs_address}"
    zygote = os.environ.get("EXPERTMESH_TEST_ZYGOTE")  # the session's workers are forked there (tests/zygote.py)
    if zygote:
        raylets |= {pid for pid, (cmd, _, _) in children.items() if "zygote.py" in cmd and zygote in cmd}
    for pid, (cmd, ppid, rss) in children.items():
        if ppid in raylets and cmd.startswith("ray::") and not cmd.startswith("ray::IDLE"):
            procs[pid] = (cmd.split(" ")[0], rss)
    return procs


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


def settled_processes(gcs_address: str, timeout_s: float = 15.0) -> dict[int, tuple[str, int]]:
    """`serving_processes` once two reads 1 s apart name the same ones: actors an earlier test on
    this cluster let go (a mesh shut down, a shard or group taken out) exit a moment later."""
    procs, deadline = serving_processes(gcs_address), time.time() + timeout_s
    while time.time() < deadline:
        time.sleep(1.0)
        again = serving_processes(gcs_address)
        if set(again) == set(procs):
            break
        procs = again
    return procs


def test_32_streaming_clients(server, ray_cluster):
    gcs = ray_cluster.get_runtime_context().gcs_address
    for i in range(4):  # warm up, then take the memory baseline
        stream_once(server, "acme", i)
    procs = settled_processes(gcs)
    titles = sorted(t for t, _ in procs.values())
    for role in ROLES:
        assert any(role in t for t in titles), f"no {role} process among {titles}"
    procs = {pid: p for pid, p in procs.items() if any(role in p[0] for role in ROLES)}
    before = sum(rss for _, rss in procs.values())
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
    now = serving_processes(gcs)
    after = sum(rss for pid, (_, rss) in now.items() if pid in procs)
    print(f"outcomes {dict(outcomes)}; serving RSS ({len(procs)} processes) "
          f"{before / 2**20:.0f} -> {after / 2**20:.0f} MiB")
    assert set(procs) <= set(now), f"serving processes exited: {[procs[p][0] for p in set(procs) - set(now)]}"
    assert set(outcomes) <= {"complete", "429", "503"}, outcomes
    assert outcomes["complete"] >= 32
    assert after < before * 1.10, f"memory grew {before / 2**20:.0f} -> {after / 2**20:.0f} MiB"
