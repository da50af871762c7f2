"""Two meshes on one store (a RayService upgrade runs the old and the new cluster side by side):
how soon what one mesh does is seen by the other.

Built-in model; meshes A and B on one Ray cluster and one store directory, each a router and
one colocated worker. Per trial, a fresh context (4K tokens, exact) registered through A; then
  answered   B's first `forward_logits` over it, timed from A's `register_context` returning
             (B finds it in the store on a miss), against A's own first answer (the baseline)
  listed     a second context B is never asked about: from A's `register_context` returning
             until B's `contexts()` lists it (B re-reads the directory every SYNC_S)
  refused    after A drops it: until B refuses it (ContextNotFound), never answering over
             deleted files; the files outlive the drop by GRACE_S while B is live
Writes benchmarks/results/shared_store.json.

    python benchmarks/bench_shared_store.py [--trials 5] [--context-tokens 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = [5, 17, 42, 99, 7, 3]


def until(check, within_s: float, poll_s: float = 0.02) -> float:
    """Seconds until check() returns True (polled), or raise after within_s."""
    t0 = time.perf_counter()
    while not check():
        if time.perf_counter() - t0 > within_s:
            raise TimeoutError(f"not within {within_s} s")
        time.sleep(poll_s)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--context-tokens", type=int, default=4096)
    ap.add_argument("--out", default=str(RESULTS / "shared_store.json"))
    args = ap.parse_args()

    import numpy as np
    import ray

    import expertmesh as em
    from expertmesh.store.catalog import GRACE_S, SYNC_S

    ray.init(resources={"context_shard": 4, "expert_group": 4}, include_dashboard=False, log_to_driver=False)
    store = tempfile.mkdtemp(prefix="expertmesh-shared-")
    layout = {"context_shards": 1, "expert_groups": 1, "colocate": True, "store": store}
    a, b = em.Mesh.start(**layout), em.Mesh.start(**layout)
    rng = np.random.default_rng(0)
    trials = []
    try:
        warm = a.register_context(rng.integers(4, 260, 512).tolist())
        a.forward_logits(PROMPT, context_id=warm.id), b.forward_logits(PROMPT, context_id=warm.id)
        for _ in range(args.trials):
            ids = rng.integers(4, 260, args.context_tokens).tolist()
            t0 = time.perf_counter()
            ctx = a.register_context(ids, mode="exact")
            registered = time.perf_counter() - t0
            t0 = time.perf_counter()
            theirs = b.forward_logits(PROMPT, context_id=ctx.id)
            answered = time.perf_counter() - t0
            t0 = time.perf_counter()
            ours = a.forward_logits(PROMPT, context_id=ctx.id)
            own = time.perf_counter() - t0
            assert np.array_equal(theirs, ours)
            quiet = a.register_context(ids[: args.context_tokens // 2], mode="exact")  # B never asked for it
            listed = until(lambda: quiet.id in {c.id for c in b.contexts()}, SYNC_S + 10)
            a.drop_context(quiet.id)
            a.drop_context(ctx.id)

            def refused() -> bool:
                try:
                    b.forward_logits(PROMPT, context_id=ctx.id)
                except em.ContextNotFound:
                    return True
                return False
            trials.append({"register_s": registered, "other_first_answer_s": answered, "own_answer_s": own,
                           "other_lists_it_after_s": listed, "other_refuses_drop_after_s": until(refused, SYNC_S + 10)})
            print(trials[-1], flush=True)
    finally:
        a.shutdown(), b.shutdown()
        ray.shutdown()

    def summary(key: str) -> dict:
        xs = [t[key] for t in trials]
        return {"median": statistics.median(xs), "max": max(xs)}
    report = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "machine": {"cpus": os.cpu_count()},
              "model": "default (built-in)", "context_tokens": args.context_tokens, "trials": trials,
              "sync_s": SYNC_S, "grace_s": GRACE_S, "layout": "two meshes, each a router + 1 colocated worker",
              "summary": {k: summary(k) for k in trials[0]},
              "ratios": {"other_first_answer_over_own": statistics.median(
                  t["other_first_answer_s"] / t["own_answer_s"] for t in trials)}}
    out = Path(args.out)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["summary"], indent=1), report["ratios"], f"wrote {out}")


if __name__ == "__main__":
    main()
