"""Expert load balancing benchmark: balancedness per MoE layer and step time at batch 32,
before and after `Mesh.balance_experts` (engine/expert_placement.py), on text the placement was
not planned from.

Built-in model (8 experts, top-1, 4 MoE layers), 1 context shard + 4 expert groups on this
host's Ray cluster, the demo document registered as the shared context. Same run:

  plan       32 requests at once (batch 32), prompts cut from one held-out text (KJV, which
             the model never trained on), 8 new tokens each: the routers count tokens per
             expert; `balance_experts(redundant=R)` plans and applies a placement from it
  measure    32 other requests at once from another held-out text (the Debian Reference),
             16 greedy tokens each, before and after the placement: (token, expert) rows each
             group computed per layer -> balancedness (max / mean group rows), and the decode
             step time at batch 32 (router step seconds / steps). Greedy tokens before and after
             are compared: the same, request by request.
  --skew S   the same with the model's router gate rows of experts 0 and 1 raised by S x their
             mean magnitude (a model whose hot experts are hotter), in a second mesh

Writes benchmarks/results/eplb.json.

    python benchmarks/bench_eplb.py [--redundant 4,8] [--skew 0.5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 32


def prompts(text: bytes, tokenizer, n: int, length: int, seed: int) -> list[list[int]]:
    import random

    ids = tokenizer.encode(text[: 2_000_000].decode("utf-8", "replace"))
    rng = random.Random(seed)
    return [ids[(s := rng.randrange(0, len(ids) - length)): s + length] for _ in range(n)]


def group_rows(mesh) -> dict[int, list[int]]:
    load = mesh.stats()["router"]["expert_load"]["groups"]
    return {int(k): list(v) for k, v in load.items()}


def wave(mesh, ctx_id: str, batch: list[list[int]], new: int) -> tuple[list, dict, float]:
    """The requests at once; their tokens, the rows per group per layer they caused, the mean
    step seconds of the router over them."""
    import ray

    before_rows, before = group_rows(mesh), ray.get(mesh.router.stats.remote())
    with ThreadPoolExecutor(len(batch)) as pool:
        outs = list(pool.map(lambda p: mesh.generate(p, context_id=ctx_id, max_new_tokens=new,
                                                     ignore_eos=True).token_ids, batch))
    after_rows, after = group_rows(mesh), ray.get(mesh.router.stats.remote())
    rows = {}
    for layer, now in after_rows.items():
        was = before_rows.get(layer, [0] * len(now))
        was = was + [0] * (len(now) - len(was))
        rows[layer] = [a - b for a, b in zip(now, was)]
    steps = after["steps"] - before["steps"]
    return outs, rows, (after["step_seconds"] - before["step_seconds"]) / max(steps, 1)


def balancedness(rows: dict[int, list[int]]) -> dict[int, float]:
    return {layer: max(r) / (sum(r) / len(r)) for layer, r in rows.items() if sum(r)}


def one(checkpoint: str | None, label: str, plan_text: bytes, measure_text: bytes, redundant: int) -> dict:
    import expertmesh as em
    from expertmesh.pipelines.demo_real import DOCUMENT

    mesh = em.Mesh.start(checkpoint, context_shards=1, expert_groups=4, max_batch_tokens=4096)
    try:
        doc = mesh.tokenizer.encode(DOCUMENT.read_text())
        ctx = mesh.register_context(doc, mode="exact")
        plan = prompts(plan_text, mesh.tokenizer, BATCH, 48, seed=1)
        measure = prompts(measure_text, mesh.tokenizer, BATCH, 48, seed=2)
        wave(mesh, ctx.id, measure[:4], 2)  # warm-up (not counted below)
        wave(mesh, ctx.id, plan, 8)
        tokens_before, rows_before, step_before = wave(mesh, ctx.id, measure, 16)
        t0 = time.perf_counter()
        report = mesh.balance_experts(redundant=redundant)
        applied_s = time.perf_counter() - t0
        tokens_after, rows_after, step_after = wave(mesh, ctx.id, measure, 16)
        b0, b1 = balancedness(rows_before), balancedness(rows_after)
        return {"model": label, "redundant_per_layer": redundant, "balance_call_s": applied_s,
                "placement": {k: report[k] for k in ("version", "replicas", "placed_off_own_group", "loaded",
                                                     "balancedness_before", "balancedness_planned")},
                "measured_on": "32 Debian Reference windows of 48 tokens, 16 greedy tokens each (not the planning text)",
                "balancedness_before": b0, "balancedness_after": b1,
                "max_balancedness_before": max(b0.values()), "max_balancedness_after": max(b1.values()),
                "rows_before": rows_before, "rows_after": rows_after,
                "step_ms_batch32_before": step_before * 1e3, "step_ms_batch32_after": step_after * 1e3,
                "step_ratio_after_over_before": step_after / step_before,
                "same_tokens": tokens_before == tokens_after}
    finally:
        mesh.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redundant", default="4,8", help="extra expert copies per MoE layer (a run each)")
    ap.add_argument("--skew", type=float, default=0.5, help="0: the built-in model only")
    ap.add_argument("--out", default=str(RESULTS / "eplb.json"))
    args = ap.parse_args()
    import ray

    from expertmesh.model.default import default_checkpoint
    from expertmesh.model.hot_experts import with_hot_experts
    from expertmesh.pipelines import text_sources

    plan_text, measure_text = text_sources.load("kjv").data, text_sources.load("debian-reference").data
    ray.init(include_dashboard=False)
    copies = [int(r) for r in args.redundant.split(",")]
    runs = [one(None, "built-in", plan_text, measure_text, r) for r in copies]
    if args.skew:
        with tempfile.TemporaryDirectory() as tmp:
            path = with_hot_experts(default_checkpoint(), Path(tmp) / "skewed", (0, 1), args.skew)
            runs.append(one(path, f"built-in, gate rows of experts 0-1 raised {args.skew:g}x", plan_text,
                            measure_text, copies[-1]))
    out = {"benchmark": "eplb", "host": "this machine's CPU, one Ray node", "batch": BATCH,
           "expert_groups": 4, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    for r in runs:
        print(f"{r['model']}, {r['redundant_per_layer']} copies a layer: balancedness max {r['max_balancedness_before']:.3f} -> {r['max_balancedness_after']:.3f}, "
              f"step at batch 32 {r['step_ms_batch32_before']:.1f} -> {r['step_ms_batch32_after']:.1f} ms, "
              f"same tokens {r['same_tokens']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
