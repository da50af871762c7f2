"""Context store benchmark: restart vs recompute, decode from the store, memory at 1M and 10M tokens.

Built-in model, 4 context shards + 2 expert groups, a passkey needle in filler text, blockwise
registration, greedy answers, the store on local disk. Same run, side by side:

  restart   (1M)  a context registered on a store: from `Mesh.start(store=...)` returning (a fresh
                  Ray cluster, after the first mesh shut down) to the first answer over it, vs
                  `register_context` of the same tokens plus the first answer; also the whole
                  restart (cluster and actors included) until that answer.
  decode    (1M)  decode step at batch 1 and 16: KV in the store with a small hot budget and
                  `top_pages`, vs all KV hot in memory (exact, and with the same `top_pages`).
  tenm      (10M) a 10,000,000-token context with needles at depths 0, 0.5 and 1 (the three
                  contexts differ only in the needle's segment: the others' stored KV is reused):
                  registration time, store size, time to first token with `top_pages` and exact.
  memory          peak resident memory of the mesh's processes (driver + actors), sampled every
                  0.2 s, with the same `shard_memory_bytes`, at 1M and at 10M tokens.

Writes benchmarks/results/store.json (and store_10m.json for --tenm).

    python benchmarks/bench_store.py [--tokens 1000000] [--store DIR]
    python benchmarks/bench_store.py --tenm [--tokens 10000000] [--store DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
QUESTION = " What is the pass key? The pass key is"


class PeakRSS:
    """Resident memory of this process and its descendants (the local cluster's raylet, GCS and
    every worker), sampled in a thread, as the sum of their proportional set sizes (Pss: pages
    shared between processes, such as Ray's object store, counted once over all of them)."""

    def __init__(self, period: float = 0.2) -> None:
        self.peak = self.now = 0
        self.by_process: dict[str, int] = {}  # peak Pss per process title (ray::Router, ...)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._t.start()

    def sample(self) -> int:
        """Sum of Pss over this process and its descendants."""
        parent, rss, title = {}, {}, {}
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                stat = open(f"/proc/{pid}/stat").read()
                parent[int(pid)] = int(stat[stat.rindex(")") + 2:].split()[1])
                title[int(pid)] = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[0].decode()[:60]
                for line in open(f"/proc/{pid}/smaps_rollup"):
                    if line.startswith("Pss:"):
                        rss[int(pid)] = int(line.split()[1]) * 1024
            except (OSError, ValueError):
                continue
        me, total = os.getpid(), 0
        for pid in rss:
            p = pid
            while p and p != me:
                p = parent.get(p, 0)
            if p == me:
                total += rss[pid]
                name = "driver" if pid == me else title.get(pid, "?").split(".")[0].split(" ")[0]
                self.by_process[name] = max(self.by_process.get(name, 0), rss[pid])
        return total

    def _run(self, period: float) -> None:
        while not self._stop.is_set():
            self.now = self.sample()
            self.peak = max(self.peak, self.now)
            time.sleep(period)

    def reset(self) -> None:
        self.peak = self.sample()
        self.by_process = {}

    def stop(self) -> None:
        self._stop.set()


def haystack(n: int) -> np.ndarray:
    """n byte-tokens of the passkey task's filler after its intro (byte tokenizer: byte + 4)."""
    from expertmesh.pipelines import tasks

    intro = tasks.PASSKEY_INTRO.encode()
    filler = tasks.PASSKEY_FILLER.encode()
    reps = -(-(n - len(intro)) // len(filler))
    raw = np.frombuffer(intro + filler * reps, dtype=np.uint8)[:n]
    return raw.astype(np.int64) + 4


def with_needle(base: np.ndarray, depth: float, key: int) -> np.ndarray:
    """The haystack with a passkey needle written over the filler at `depth` (same length)."""
    from expertmesh.pipelines import tasks

    needle = np.frombuffer(f" The pass key is {key}. Remember it. {key} is the pass key.".encode(),
                           dtype=np.uint8).astype(np.int64) + 4
    flen, intro = len(tasks.PASSKEY_FILLER), len(tasks.PASSKEY_INTRO)
    span = len(base) - intro - len(needle) - flen
    at = intro + int(depth * span) // flen * flen  # on a filler sentence boundary
    out = base.copy()
    out[at:at + len(needle)] = needle
    return out


def ask(mesh, ctx_id: str, key: int, top_pages: int | None) -> dict:
    prompt = mesh.tokenizer.encode(QUESTION)
    want = f" {key}."
    res = mesh.generate(prompt, context_id=ctx_id, max_new_tokens=len(want), top_pages=top_pages)
    return {"answer": res.text, "correct": res.text.strip().startswith(str(key)), "ttft_s": res.ttft_s,
            "total_s": res.total_s, "pages": res.pathway.get("pages")}


def decode_step(mesh, ctx_id: str, batch: int, top_pages: int | None, steps: int = 24) -> float:
    """Seconds per decode step: (total - ttft) / (steps - 1), median over the batch's requests."""
    from concurrent.futures import ThreadPoolExecutor

    prompt = mesh.tokenizer.encode(QUESTION)

    def one(_):
        r = mesh.generate(prompt, context_id=ctx_id, max_new_tokens=steps, top_pages=top_pages)
        return (r.total_s - r.ttft_s) / (len(r.token_ids) - 1)

    one(0)  # warm: pages loaded, paths compiled
    with ThreadPoolExecutor(batch) as pool:
        return statistics.median(pool.map(one, range(batch)))


def start(store: Path, budget: int, **kw):
    import expertmesh as em

    return em.Mesh.start(context_shards=4, expert_groups=2, store=str(store), shard_memory_bytes=budget, **kw)


def run_restart(args, rss: PeakRSS) -> dict:
    import ray

    store = Path(args.store)
    shutil.rmtree(store, ignore_errors=True)
    ids = with_needle(haystack(args.tokens), 0.5, 48213)
    out: dict = {"tokens": args.tokens, "kv_dtype": args.kv_dtype, "top_pages": args.top_pages,
                 "hot_budget_bytes": args.hot_budget, "cold_budget_bytes": args.cold_budget}

    # 1. register on a fresh store, all KV hot
    mesh = start(store, args.hot_budget, kv_dtype=args.kv_dtype)
    rss.reset()
    t0 = time.perf_counter()
    ctx = mesh.register_context(ids, mode="blockwise")
    out["register_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    first = ask(mesh, ctx.id, 48213, None)
    out["first_answer_after_register_s"] = time.perf_counter() - t1
    out["register_peak_rss_bytes"] = rss.peak
    out["register_peak_by_process"] = dict(rss.by_process)
    out["answer_fresh"] = first
    out["decode_hot_exact_b1_s"] = decode_step(mesh, ctx.id, 1, None)
    out["decode_hot_exact_b16_s"] = decode_step(mesh, ctx.id, 16, None)
    out["decode_hot_top_pages_b1_s"] = decode_step(mesh, ctx.id, 1, args.top_pages)
    out["decode_hot_top_pages_b16_s"] = decode_step(mesh, ctx.id, 16, args.top_pages)
    out["store_bytes"] = sum(f.stat().st_size for f in (store / "segments").iterdir())
    mesh.shutdown()
    assert not ray.is_initialized()

    # 2. restart: a new cluster and mesh on the same store, a small hot budget
    t0 = time.perf_counter()
    mesh = start(store, args.cold_budget, kv_dtype=args.kv_dtype)
    t_started = time.perf_counter()
    rss.reset()
    listed = [c.id for c in mesh.contexts()]
    again = ask(mesh, ctx.id, 48213, args.top_pages)
    t_answer = time.perf_counter()
    out["restart"] = {"mesh_start_s": t_started - t0, "listed": ctx.id in listed,
                      "first_answer_after_start_s": t_answer - t_started, "whole_restart_s": t_answer - t0,
                      "answer": again}
    t1 = time.perf_counter()
    out["restart"]["first_exact_answer"] = ask(mesh, ctx.id, 48213, None)
    out["restart"]["first_exact_answer_s"] = time.perf_counter() - t1
    out["decode_store_top_pages_b1_s"] = decode_step(mesh, ctx.id, 1, args.top_pages)
    out["decode_store_top_pages_b16_s"] = decode_step(mesh, ctx.id, 16, args.top_pages)
    out["serve_peak_rss_bytes"] = rss.peak
    out["serve_peak_by_process"] = dict(rss.by_process)
    out["shard_pools"] = [s["pool"] for s in mesh.stats()["shards"]]
    mesh.shutdown()

    base = out["register_s"] + out["first_answer_after_register_s"]
    out["ratios"] = {
        "restart_vs_register_plus_answer": base / out["restart"]["first_answer_after_start_s"],
        "decode_store_top_pages_vs_hot_exact_b1": out["decode_store_top_pages_b1_s"] / out["decode_hot_exact_b1_s"],
        "decode_store_top_pages_vs_hot_exact_b16": out["decode_store_top_pages_b16_s"] / out["decode_hot_exact_b16_s"],
        "decode_store_top_pages_vs_hot_top_pages_b1":
            out["decode_store_top_pages_b1_s"] / out["decode_hot_top_pages_b1_s"],
        "decode_store_top_pages_vs_hot_top_pages_b16":
            out["decode_store_top_pages_b16_s"] / out["decode_hot_top_pages_b16_s"],
    }
    return out


def run_tenm(args, rss: PeakRSS) -> dict:
    store = Path(args.store)
    shutil.rmtree(store, ignore_errors=True)
    base = haystack(args.tokens)
    keys = {d: k for d, k in {0.0: 31337, 0.5: 48213, 1.0: 27182}.items() if d in args.depths}
    out: dict = {"tokens": args.tokens, "kv_dtype": args.kv_dtype, "top_pages": args.top_pages,
                 "budget_bytes": args.cold_budget, "depths": []}
    mesh = start(store, args.cold_budget, kv_dtype=args.kv_dtype)
    rss.reset()
    for depth, key in keys.items():
        ids = with_needle(base, depth, key)
        t0 = time.perf_counter()
        ctx = mesh.register_context(ids, mode="blockwise")
        reg = time.perf_counter() - t0
        row = {"depth": depth, "key": key, "register_s": reg, "context_id": ctx.id,
               "top_pages": ask(mesh, ctx.id, key, args.top_pages), "exact": ask(mesh, ctx.id, key, None)}
        row["peak_rss_bytes"] = rss.peak
        row["peak_by_process"] = dict(rss.by_process)
        out["depths"].append(row)
        print(json.dumps({k: v for k, v in row.items()}, default=str), flush=True)
    out["store_bytes"] = sum(f.stat().st_size for f in (store / "segments").iterdir())
    out["peak_rss_bytes"] = rss.peak
    out["shard_pools"] = [s["pool"] for s in mesh.stats()["shards"]]
    mesh.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--tenm", action="store_true", help="the 10M-token run (default tokens 10,000,000)")
    ap.add_argument("--store", default="/tmp/expertmesh-bench-store")
    ap.add_argument("--kv-dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--top-pages", type=int, default=32)
    ap.add_argument("--hot-budget", type=int, default=1 << 30, help="shard_memory_bytes with all KV hot")
    ap.add_argument("--cold-budget", type=int, default=64 << 20, help="shard_memory_bytes, KV in the store")
    ap.add_argument("--depths", type=lambda x: [float(d) for d in x.split(",")], default=[0.0, 0.5, 1.0],
                    help="--tenm: needle depths (comma-separated, of 0, 0.5, 1)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    # not multiples of the 2048-token chunk: the question starts inside a chunk, as users' do
    args.tokens = args.tokens or (10_000_000 if args.tenm else 1_000_000)
    rss = PeakRSS()
    t0 = time.perf_counter()
    res = run_tenm(args, rss) if args.tenm else run_restart(args, rss)
    rss.stop()
    res["wall_s"] = time.perf_counter() - t0
    res["loadavg"] = os.getloadavg()
    res["machine"] = f"{os.cpu_count()} CPU cores"
    RESULTS.mkdir(exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / ("store_10m.json" if args.tenm else "store.json")
    out.write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
