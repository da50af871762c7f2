"""Elastic context pool benchmark: a context shard lost for good under a 1M-token context, its
segment served by the survivors from the store; then a shard added and the pool rebalanced.

Built-in model, 4 context shards + 2 expert groups, the store on local disk, a passkey needle
at depth 0.5 of a 1,000,000-token context registered blockwise (as bench_store.py), greedy
answers over every page (exact attention over the registered KV). Same run:

  baseline   register_context of the tokens + the first answer: what serving the context
             again costs a mesh whose lost shard's segment is not taken over (register it again)
  takeover   shard 1 killed for good (`ray.kill`, no restart, as a host that does not come
             back): seconds from the kill until Ray reports the actor not alive, and until the
             next answer (the router leaves the shard out of the data plane, a running shard
             opens the lost segment's file and reads its pages from the store); then the next
             answer (pages hot); ratio baseline / takeover
  rebalance  `add_shards(1)` then `rebalance()`: seconds, segments moved, tokens per shard
             before and after; the answer afterwards
Every answer is checked: the same text as before the kill.

Writes benchmarks/results/elastic.json.

    python benchmarks/bench_elastic.py [--tokens 1000000] [--store DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_store import ask, haystack, with_needle  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
KEY = 48213


def run(args) -> dict:
    import ray

    import expertmesh as em
    from expertmesh.dataplane.liveness import actor_state

    store = Path(args.store)
    shutil.rmtree(store, ignore_errors=True)
    ids = with_needle(haystack(args.tokens), 0.5, KEY)
    out: dict = {"tokens": args.tokens, "kv_dtype": args.kv_dtype, "shard_memory_bytes": args.budget,
                 "context_shards": 4, "expert_groups": 2}
    mesh = em.Mesh.start(context_shards=4, expert_groups=2, store=str(store), shard_memory_bytes=args.budget,
                         kv_dtype=args.kv_dtype)
    try:
        t0 = time.perf_counter()
        ctx = mesh.register_context(ids, mode="blockwise")
        out["baseline"] = {"register_s": time.perf_counter() - t0}
        t1 = time.perf_counter()
        before = ask(mesh, ctx.id, KEY, None)
        out["baseline"] |= {"first_answer_s": time.perf_counter() - t1, "answer": before}
        out["baseline"]["register_plus_answer_s"] = out["baseline"]["register_s"] + out["baseline"]["first_answer_s"]
        out["segments"] = [{"shard": s, "tokens": n} for s, n in zip(ctx.shards, _tokens(mesh, ctx.id))]
        t1 = time.perf_counter()
        out["hot_answer"] = ask(mesh, ctx.id, KEY, None) | {"wall_s": time.perf_counter() - t1}

        victim, seen = mesh.shards[1], {}
        ray.kill(victim, no_restart=True)
        t0 = time.perf_counter()

        def watch():
            while actor_state(victim) == "ALIVE" and time.perf_counter() - t0 < 60:
                time.sleep(0.01)
            seen["ray_reported_s"] = time.perf_counter() - t0
        w = threading.Thread(target=watch)
        w.start()
        first = ask(mesh, ctx.id, KEY, None)
        took = time.perf_counter() - t0
        w.join()
        stats = ray.get(mesh.router.stats.remote())
        t1 = time.perf_counter()
        second = ask(mesh, ctx.id, KEY, None)
        out["takeover"] = {"ray_reported_s": seen["ray_reported_s"], "served_again_s": took,
                           "group_formation_s": stats.get("group_formation_seconds"),
                           "answer": first, "same_answer": first["answer"] == before["answer"],
                           "next_answer_s": time.perf_counter() - t1, "next_answer": second}

        t0 = time.perf_counter()
        added = mesh.add_shards(1)
        t1 = time.perf_counter()
        res = mesh.rebalance()
        t2 = time.perf_counter()
        after = ask(mesh, ctx.id, KEY, None)
        out["rebalance"] = {"add_shards_s": t1 - t0, "added": added, "rebalance_s": res["seconds"],
                            "rebalance_call_s": t2 - t1, "moved": res["moved"], "tokens_before": res["tokens_before"],
                            "tokens_after": res["tokens_after"], "first_answer_s": time.perf_counter() - t2,
                            "answer": after, "same_answer": after["answer"] == before["answer"]}
        out["ratios"] = {"register_plus_answer_vs_takeover": out["baseline"]["register_plus_answer_s"] / took}
    finally:
        mesh.shutdown()
    return out


def _tokens(mesh, context_id: str) -> list[int]:
    """Tokens per segment of a context (from each shard's own count)."""
    import ray

    held = ray.get([s.contexts.remote() for s in mesh.shards])
    return [h[context_id] for h in held if context_id in h]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--store", default="/tmp/expertmesh-bench-elastic")
    ap.add_argument("--kv-dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--budget", type=int, default=1 << 30, help="shard_memory_bytes (hot pages per shard)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    res = run(args)
    res["wall_s"] = time.perf_counter() - t0
    res["loadavg"] = os.getloadavg()
    res["machine"] = f"{os.cpu_count()} CPU cores"
    RESULTS.mkdir(exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / "elastic.json"
    out.write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps(res, indent=1, default=str))
    shutil.rmtree(args.store, ignore_errors=True)


if __name__ == "__main__":
    main()
