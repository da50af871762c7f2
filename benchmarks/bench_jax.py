"""JAX backend benchmark: context shards and expert groups on JAX vs PyTorch, same run.

Built-in model, a 16K-token context, 4 context shards + 2 expert groups:
  (a) the mesh's decode step at batch 1 and 16 (as benchmarks/bench_core.py times it), with
      all-PyTorch actors and with all-JAX actors, on a running mesh: a first round of the same
      requests (where the JAX actors compile their buckets) is timed apart;
  (b) in process (no Ray): one shard's `attend` of 16 decode queries over its 4K tokens and
      one expert group's `compute` of 16 rows, per backend: the first call (JAX: compiles)
      and the steady median;
  (c) the JAX cache: compilations over a sweep of varied requests (query rows 1..64, every
      layer), and the compilations a mesh did over its whole run (from `Mesh.stats()`).
Records os.getloadavg(): this machine is shared. Writes benchmarks/results/jax.json.

    python benchmarks/bench_jax.py [--context 16384] [--steps 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import decode_step  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _timed(fn, reps: int) -> tuple[float, float]:
    """(first call seconds, median of the next `reps` calls)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def in_process(ckpt: Path, shard_tokens: int) -> dict:
    from expertmesh.actors.context_shard import AttendItem, ContextShard
    from expertmesh.actors.expert_group import ExpertGroup
    from expertmesh.actors.jax_context_shard import JaxContextShard
    from expertmesh.jax_backend import attention as ja
    from expertmesh.jax_backend import experts as jx
    from expertmesh.model.config import ModelConfig

    cfg = ModelConfig.from_file(ckpt / "config.json")
    specs = [cfg.attention_spec(i) for i in range(cfg.num_layers)]
    rng = np.random.default_rng(0)
    kv = [(rng.standard_normal((shard_tokens, cfg.num_kv_heads, cfg.head_dim), dtype=np.float32),
           rng.standard_normal((shard_tokens, cfg.num_kv_heads, cfg.head_dim), dtype=np.float32))
          for _ in range(cfg.num_layers)]
    start = 3 * shard_tokens  # the last shard of a 4-shard context
    out: dict = {"shard_tokens": shard_tokens}
    for name, cls in (("torch", ContextShard), ("jax", JaxContextShard)):
        shard = cls(0, specs, None, 64, 1)
        shard.begin("c", f"seg-{name}", start, start + shard_tokens, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
        shard.append("c", start, [k for k, _ in kv], [v for _, v in kv], np.arange(start, start + shard_tokens))
        shard.finish("c")

        def item(rows: int, seed: int = 1) -> AttendItem:
            r = np.random.default_rng(seed)
            q = r.standard_normal((rows, cfg.num_heads, cfg.head_dim), dtype=np.float32)
            return AttendItem("c", q, np.arange(4 * shard_tokens, 4 * shard_tokens + rows), {"r": rows})

        glob = max(i for i, s in enumerate(specs) if not s.chunk_size)  # a global layer: all 4K keys
        first, steady = _timed(lambda: shard.attend(glob, [item(16)]), 20)
        out[f"attend_b16_{name}"] = {"first_s": first, "steady_s": steady}
        if name == "jax":
            before = ja.compilations()
            t0 = time.perf_counter()
            for rows in (1, 2, 3, 5, 8, 9, 13, 16, 17, 24, 31, 33, 48, 64):
                for layer in range(cfg.num_layers):
                    shard.attend(layer, [item(rows, rows)])
            out["attend_sweep"] = {"requests": 14 * cfg.num_layers, "new_compilations": ja.compilations() - before,
                                   "seconds": time.perf_counter() - t0,
                                   "buckets": "query rows -> 8, 16, 32, 64; pages per block -> powers of 2"}
    for name in ("torch", "jax"):
        group = ExpertGroup(str(ckpt), 0, range(cfg.num_experts // 2), 1, name)
        x = rng.standard_normal((16, cfg.hidden_size), dtype=np.float32)
        e = rng.integers(0, cfg.num_experts // 2, 16)
        first, steady = _timed(lambda: group.compute(0, x, e), 50)
        out[f"experts_b16_{name}"] = {"first_s": first, "steady_s": steady}
        if name == "jax":
            before = jx.compilations()
            for rows in range(1, 65):
                group.compute(rows % cfg.num_layers, rng.standard_normal((rows, cfg.hidden_size), dtype=np.float32),
                              rng.integers(0, cfg.num_experts // 2, rows))
            out["experts_sweep"] = {"requests": 64, "new_compilations": jx.compilations() - before}
    return out


def mesh_run(ckpt: Path, context: list[int], prompts: list[list[int]], steps: int, backend: str) -> dict:
    import expertmesh as em

    t0 = time.perf_counter()
    mesh = em.Mesh.start(str(ckpt), context_shards=4, expert_groups=2, shard_backend=backend,
                         expert_backend=backend)
    start_s = time.perf_counter() - t0
    try:
        warm = mesh.register_context(context[:2048])
        t0 = time.perf_counter()
        mesh.generate(prompts[0], context_id=warm.id, max_new_tokens=4)
        first_generate_s = time.perf_counter() - t0
        mesh.drop_context(warm.id)
        t0 = time.perf_counter()
        ctx = mesh.register_context(context, mode="exact")
        register_s = time.perf_counter() - t0

        def gen(p):
            return mesh.generate(p, context_id=ctx.id, max_new_tokens=steps)

        def compilations() -> dict:
            stats = mesh.stats()
            return {"shards": [s.get("jax", {}).get("compilations", 0) for s in stats["shards"]],
                    "expert_groups": [g.get("jax", {}).get("compilations", 0) for g in stats["expert_groups"]]}

        # a first round at batch 1 and 16 (both backends): the JAX actors compile their buckets
        t0 = time.perf_counter()
        gen(prompts[0])
        with ThreadPoolExecutor(len(prompts)) as pool:
            first_round = list(pool.map(gen, prompts))
        warm_s = time.perf_counter() - t0
        warm = compilations()
        one = [gen(prompts[0])]  # the measured round: the same shapes, a running mesh
        with ThreadPoolExecutor(len(prompts)) as pool:
            many = list(pool.map(gen, prompts))
        res = {"start_s": start_s, "first_generate_s": first_generate_s, "register_s": register_s,
               "first_round_s": warm_s, "first_round_decode_b16_s": decode_step(first_round),
               "decode_b1_s": decode_step(one), "decode_b16_s": decode_step(many)}
        if backend == "jax":
            after = compilations()
            res["compilations"] = {"after_first_round": warm, "after_measured_round": after,
                                   "requests": 3 + 2 * (1 + len(prompts)), "registrations": 2}
        return res
    finally:
        mesh.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--out", default=str(RESULTS / "jax.json"))
    args = ap.parse_args()

    import jax
    import ray

    from expertmesh.model.default import default_checkpoint

    load_before = os.getloadavg()
    ckpt = default_checkpoint()
    rng = np.random.default_rng(0)
    context = rng.integers(4, 260, args.context).tolist()
    prompts = [rng.integers(4, 260, 8).tolist() for _ in range(16)]
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                          "jax": jax.__version__, "ray": ray.__version__, "jax_device": str(jax.devices()[0])},
              "model": "default", "context_tokens": args.context, "context_shards": 4, "expert_groups": 2,
              "decode_steps": args.steps, "loadavg_before": load_before}
    report["in_process"] = in_process(ckpt, args.context // 4)
    report["mesh"] = {b: mesh_run(ckpt, context, prompts, args.steps, b) for b in ("torch", "jax")}
    m = report["mesh"]
    report["ratios"] = {"decode_b16_jax_over_torch": m["jax"]["decode_b16_s"] / m["torch"]["decode_b16_s"],
                        "first_round_decode_b16_jax_over_torch":
                            m["jax"]["first_round_decode_b16_s"] / m["torch"]["first_round_decode_b16_s"],
                        "decode_b1_jax_over_torch": m["jax"]["decode_b1_s"] / m["torch"]["decode_b1_s"],
                        "register_jax_over_torch": m["jax"]["register_s"] / m["torch"]["register_s"]}
    report["loadavg_after"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
