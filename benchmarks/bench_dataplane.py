"""What securing the data plane costs: the join handshake, the data-only plan encoding, and a
mesh's decode step before and after, all in the same run.

  (a) group formation over loopback (TCP and Unix), 4 actors: the authenticated join
      (handshake.py: hello, nonce, HMAC proofs both ways, handshakes side by side) against the
      unauthenticated 16-byte hello it replaced (reproduced here as the baseline);
  (b) one actor's step plan, encoded and decoded: wire.py (msgpack, checked) against pickle
      (the encoding it replaced), for a decode step at batch 1 and 16 and a 2048-token prefill
      on the default model's shape;
  (c) a mesh on the default model (socket transport, 2 context shards + 2 expert groups,
      a 4096-token context): decode step at batch 1 and batch 8, with this tree and with the
      tree before the change (`--base`, checked out into a temporary git worktree), measured
      alternately in child processes, the fastest of `--repeats` counting for each side.

Writes benchmarks/results/dataplane.json.

    python benchmarks/bench_dataplane.py [--base 389a3c4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BASE = "389a3c4"  # main before the authenticated data plane


# -- (a) formation ---------------------------------------------------------------------------
def formation(actors: int, unix: bool, reps: int) -> dict:
    from expertmesh.dataplane.handshake import new_key
    from expertmesh.dataplane.socket_group import Listener, SocketGroup

    day = timedelta(days=1)
    auth, plain = [], []
    for _ in range(reps):
        listener = Listener("127.0.0.1")
        key = new_key()
        threads = [threading.Thread(target=SocketGroup.connect, args=(listener.address, key, 1, r, 5.0, day, 5.0,
                                                                       unix)) for r in range(1, actors + 1)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        group = SocketGroup.accept(listener, key, 1, actors + 1, 10.0, day, 5.0)
        for t in threads:
            t.join()
        auth.append(time.perf_counter() - t0)
        group.abort()
        plain.append(_plain_formation(listener, actors, unix))
        listener.close()
    return {"actors": actors, "socket": "unix" if unix else "tcp", "authenticated_ms": 1e3 * statistics.median(auth),
            "plain_hello_ms": 1e3 * statistics.median(plain),
            "extra_ms": 1e3 * (statistics.median(auth) - statistics.median(plain))}


def _plain_formation(listener, actors: int, unix: bool) -> float:
    """The replaced protocol: connect, send (generation, rank) as 16 bytes, counted as a rank."""
    import struct

    hello = struct.Struct("<qq")
    host, port, name = listener.address

    def connect(rank):
        if unix:
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect("\0" + name)
        else:
            c = socket.create_connection((host, port))
        c.sendall(hello.pack(1, rank))
        conns.append(c)
    conns: list = []
    threads = [threading.Thread(target=connect, args=(r,)) for r in range(1, actors + 1)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    got = 0
    socks = [s for s in (listener.tcp, listener.unix) if s is not None]
    while got < actors:
        for s in listener.ready([], 5.0):
            if s in socks:
                conn = listener.take(s)
                conn.recv(hello.size, socket.MSG_WAITALL)
                conns.append(conn)
                got += 1
    took = time.perf_counter() - t0
    for t in threads:
        t.join()
    for c in conns:
        c.close()
    return took


# -- (b) plan encoding -----------------------------------------------------------------------
def plans() -> dict:
    from expertmesh.engine.step_plan import Part, PeerPlan

    layers, heads, head_dim, hidden = 4, 4, 32, 128  # the default model's shape

    def plan(requests: int, rows_each: int) -> tuple:
        parts, at = [], 0
        for layer in range(layers):
            items = tuple((f"ctx-{i % 2}", rows_each, np.arange(4096 + at, 4096 + at + rows_each), {f"req-{i}": rows_each},
                          None, (f"seg-{i % 2}.kv", 0, 4096)) for i in range(requests))
            parts += [Part("attend", layer, items), Part("experts", layer, packed=0, pairs=requests * rows_each * 2)]
        return PeerPlan(1, tuple(parts), heads, head_dim, hidden), requests * rows_each
    return {"decode batch 1": plan(1, 1), "decode batch 16": plan(16, 1), "prefill 2048": plan(1, 2048)}


def codec(reps: int) -> list[dict]:
    from expertmesh.dataplane.wire import WireLimits, decode_plan, encode_plan

    limits = WireLimits(4, 32, 128, 4)
    out = []
    for name, (plan, rows) in plans().items():
        def wire():
            decode_plan(encode_plan(plan, rows), limits, 1)

        def pickled():
            pickle.loads(pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL))
        t_wire, t_pickle = _time(wire, reps), _time(pickled, reps)
        out.append({"plan": name, "wire_us": 1e6 * t_wire, "pickle_us": 1e6 * t_pickle, "ratio": t_wire / t_pickle,
                    "wire_bytes": len(encode_plan(plan, rows)),
                    "pickle_bytes": len(pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL))})
    return out


def _time(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


# -- (c) a mesh's decode step, this tree and the base ------------------------------------------
def side() -> dict:
    """Child process: a mesh of whatever `expertmesh` is first on sys.path; decode steps."""
    from concurrent.futures import ThreadPoolExecutor

    import ray

    import expertmesh as em

    rng = np.random.default_rng(0)
    context = rng.integers(0, 256, 4096).tolist()
    prompts = [rng.integers(0, 256, 8).tolist() for _ in range(8)]
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    mesh = em.Mesh.start(context_shards=2, expert_groups=2)
    try:
        where = ray.get(mesh.shards[0].__ray_call__.remote(lambda self: __import__("expertmesh").__file__))
        ctx = mesh.register_context(context)
        mesh.generate(prompts[0], context_id=ctx.id, max_new_tokens=4)

        def gen(p):  # the public call: the same in the base tree and this one
            return mesh.generate(p, context_id=ctx.id, max_new_tokens=24)

        def step(results):
            return statistics.median((r.total_s - r.ttft_s) / (r.completion_tokens - 1) for r in results)
        b1, b8 = [], []
        with ThreadPoolExecutor(8) as pool:
            for _ in range(3):
                b1.append(step([gen(prompts[0])]))
                b8.append(step(list(pool.map(gen, prompts))))
        return {"decode_b1_ms": 1e3 * min(b1), "decode_b8_ms": 1e3 * min(b8), "expertmesh": where,
                "groups_formed": ray.get(mesh.router.stats.remote()).get("process_groups_formed")}
    finally:
        mesh.shutdown()
        ray.shutdown()


def run_side(tree: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--side"], env=env, cwd=tempfile.gettempdir(),
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"the side run in {tree} failed:\n{out.stderr[-3000:]}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["expertmesh"].startswith(str(tree)), f"measured {got['expertmesh']}, not {tree}"
    return got


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default=BASE, help="the commit measured as 'before'")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--side", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS / "dataplane.json"))
    args = ap.parse_args()
    if args.side:
        print(json.dumps(side()))
        return
    sys.path.insert(0, str(ROOT))
    result = {"date": time.strftime("%Y-%m-%d"), "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "loadavg_1_5_15min": {"before": os.getloadavg()}}
    result["formation"] = [formation(4, unix, 30) for unix in (False, True)]
    for f in result["formation"]:
        print(f"formation, 4 actors over {f['socket']}: {f['authenticated_ms']:.2f} ms authenticated vs "
              f"{f['plain_hello_ms']:.2f} ms plain hello (+{f['extra_ms']:.2f} ms)")
    result["plan_codec"] = codec(200)
    for c in result["plan_codec"]:
        print(f"plan {c['plan']}: wire {c['wire_us']:.1f} us vs pickle {c['pickle_us']:.1f} us "
              f"(x{c['ratio']:.2f}); {c['wire_bytes']} vs {c['pickle_bytes']} bytes")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.base], check=True,
                       capture_output=True)
        try:
            runs: dict[str, list[dict]] = {"before": [], "after": []}
            for _ in range(args.repeats):
                runs["before"].append(run_side(base))
                runs["after"].append(run_side(ROOT))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], capture_output=True)
    best = {k: {m: min(r[m] for r in v) for m in ("decode_b1_ms", "decode_b8_ms")} for k, v in runs.items()}
    result["decode"] = {"base_commit": args.base, "runs": runs, "best": best,
                        "ratio_b1": best["after"]["decode_b1_ms"] / best["before"]["decode_b1_ms"],
                        "ratio_b8": best["after"]["decode_b8_ms"] / best["before"]["decode_b8_ms"]}
    print(f"decode step, default model, 2 shards + 2 groups, socket transport: batch 1 "
          f"{best['before']['decode_b1_ms']:.2f} -> {best['after']['decode_b1_ms']:.2f} ms "
          f"(x{result['decode']['ratio_b1']:.3f}); batch 8 {best['before']['decode_b8_ms']:.2f} -> "
          f"{best['after']['decode_b8_ms']:.2f} ms (x{result['decode']['ratio_b8']:.3f})")
    result["loadavg_1_5_15min"]["after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
