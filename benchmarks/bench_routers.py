"""Several routers over one context pool: decode throughput with R = 1 and R = 2 routers, and
the extra latency a request sees when its router is killed under it.

Built-in model, 4 context shards + 2 expert groups, a shared 16K-token context (exact), greedy.
For each R, same run:
  throughput  32 concurrent `Mesh.generate` calls of 32 new tokens each (spread over the
              routers): generated tokens / wall time; per router the steps it ran and their
              mean time (where a step's time goes, per router)
  failover    one request of 384 new tokens; its router is killed (Ray restarts it) after 1 s:
              the request's latency against the same request undisturbed. R = 1: it waits for
              the router's restart and runs again; R = 2: it runs again on the other router.
This 2-core machine cannot show throughput scaling with routers (every actor shares the two
cores); the figures say what R = 2 costs or gains here. `bench_gpu.py --routers` is the GPU run.

Writes benchmarks/results/routers.json.

    python benchmarks/bench_routers.py [--context-tokens 16384] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
FAILOVER_TOKENS = 384  # long enough to be in flight when its router is killed


def run_one(routers: int, args) -> dict:
    import numpy as np
    import ray

    import expertmesh as em

    mesh = em.Mesh.start(context_shards=4, expert_groups=2, routers=routers)
    try:
        rng = np.random.default_rng(0)
        ctx = mesh.register_context(rng.integers(4, 200, args.context_tokens).tolist(), mode="exact")
        prompt = mesh.tokenizer.encode(" Summarise the text above.")
        mesh.generate(prompt, context_id=ctx.id, max_new_tokens=4)  # warm every path
        before = [ray.get(r.stats.remote()) for r in mesh.routers]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.batch) as pool:
            results = list(pool.map(lambda _: mesh.generate(prompt, context_id=ctx.id, max_new_tokens=32),
                                    range(args.batch)))
        wall = time.perf_counter() - t0
        after = [ray.get(r.stats.remote()) for r in mesh.routers]
        per_router = [{"steps": a["steps"] - b["steps"],
                       "mean_step_s": (a["step_seconds"] - b["step_seconds"]) / max(1, a["steps"] - b["steps"])}
                      for a, b in zip(after, before)]
        tokens = sum(len(r.token_ids) for r in results)
        out = {"routers": routers, "throughput": {"requests": args.batch, "tokens": tokens, "wall_s": wall,
                                                  "tokens_per_s": tokens / wall, "per_router": per_router}}

        t0 = time.perf_counter()
        # ignore_eos: the built-in model may answer the random context with eos at once
        want = mesh.generate(prompt, context_id=ctx.id, max_new_tokens=FAILOVER_TOKENS, ignore_eos=True)
        normal = time.perf_counter() - t0
        got, t0 = {}, time.perf_counter()
        worker = threading.Thread(target=lambda: got.setdefault("res", mesh.generate(
            prompt, context_id=ctx.id, max_new_tokens=FAILOVER_TOKENS, ignore_eos=True)))
        worker.start()
        time.sleep(1.0)
        busy = [ray.get(r.stats.remote())["running"] for r in mesh.routers]
        victim = max(range(routers), key=lambda i: busy[i])
        assert busy[victim] > 0, "the request ended before its router was killed: raise FAILOVER_TOKENS"
        ray.kill(mesh.routers[victim], no_restart=False)
        worker.join(180)
        took = time.perf_counter() - t0
        out["failover"] = {"undisturbed_s": normal, "with_kill_s": took, "extra_s": took - normal,
                           "same_tokens": got["res"].token_ids == want.token_ids, "killed_router": victim}
        time.sleep(5)  # the killed router back before shutdown
        return out
    finally:
        mesh.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context-tokens", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    runs = [run_one(r, args) for r in (1, 2)]
    res = {"context_tokens": args.context_tokens, "batch": args.batch, "runs": runs,
           "ratios": {"tokens_per_s_r2_vs_r1": runs[1]["throughput"]["tokens_per_s"] /
                      runs[0]["throughput"]["tokens_per_s"],
                      "failover_extra_r2_vs_r1": runs[1]["failover"]["extra_s"] / runs[0]["failover"]["extra_s"]},
           "wall_s": time.perf_counter() - t0, "loadavg": os.getloadavg(), "machine": f"{os.cpu_count()} CPU cores"}
    RESULTS.mkdir(exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / "routers.json"
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
