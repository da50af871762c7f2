"""GPU benchmark: an OLMoE-1B-7B-shaped model in bf16 on one GPU, mesh vs single process vs HF.

The model: allenai/OLMoE-1B-7B-0924's config.json values (hidden 2048, 16 layers, 16 heads of
128, 64 experts, top-8, expert intermediate 1024, vocab 50304, qk-norm, rope_theta 10000) in a
`transformers.OlmoeConfig` with max_position_embeddings raised to hold the context; random
weights (no download), saved as a bf16 checkpoint. Measures, on the same GPU in the same run:

  (a) registration time of a 128K-token context (exact mode),
  (b) decode tokens/s at batch 1, 16 and 64 over it,

for the mesh (`Mesh.start(ckpt, context_shards=4, expert_groups=4, device="cuda",
dtype="bfloat16", data_plane="collective", colocate=--colocate)`), for the same router code in
this process (in-process ContextShard / ExpertGroup / Router, as bench_core.py's
single_process), and for `transformers` generate with the context in the prompt (at the
shorter lengths of --hf-contexts: 128K does not fit or takes too long; OOMs are recorded).
GPU memory per actor: each actor's `stats()` where it reports CUDA memory, else nvidia-smi.
Each measure is taken --repeats times; the fastest counts. Ratios: mesh/single decode
throughput per batch (target >= 0.7 at batch 64), and mesh/single registration time.
Writes benchmarks/results/gpu.json.

    python benchmarks/bench_gpu.py [--colocate] [--context 131072] [--batches 1,16,64]
    python benchmarks/bench_gpu.py --smoke     # the same code on the CPU: tiny model, tiny context

Needs only the project's .venv with the test extra (transformers); no network.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"

# allenai/OLMoE-1B-7B-0924 config.json
OLMOE_1B_7B = dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                   num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                   rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=4096, clip_qkv=None,
                   norm_topk_prob=False, tie_word_embeddings=False, pad_token_id=1, eos_token_id=50279,
                   bos_token_id=None)
TINY = dict(OLMOE_1B_7B, vocab_size=300, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
            pad_token_id=0, eos_token_id=299)


def build_checkpoint(path: Path, values: dict, context: int, device: torch.device, dtype: torch.dtype) -> Path:
    """Random weights in an OlmoeConfig with room for the context, saved in `dtype`."""
    import transformers as tf

    cfg = tf.OlmoeConfig(**dict(values, max_position_embeddings=max(values["max_position_embeddings"],
                                                                       1 << (context + 4096 - 1).bit_length())))
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # 7B parameters: initialise on the GPU, in bf16
            model = tf.OlmoeForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(str(path))
    del model
    empty_cache(device)
    return path


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def decode_step(results: list) -> float:
    """Seconds between output tokens: median over the batch's requests."""
    return statistics.median((r.total_s - r.ttft_s) / (r.completion_tokens - 1) for r in results)


def best(runs: dict[str, list[float]]) -> dict:
    out = {k: min(v) for k, v in runs.items()}
    out["runs"] = runs
    return out


def throughput(res: dict, batches: list[int]) -> dict:
    """decode_b{B}_s (seconds per step) -> decode_b{B}_tok_s (tokens/s over the batch)."""
    return {f"decode_b{b}_tok_s": b / res[f"decode_b{b}_s"] for b in batches if f"decode_b{b}_s" in res}


def kv_bytes(ckpt: Path, tokens: int, kv_dtype: str) -> int:
    """Bytes of K and V of `tokens` context tokens (what a hot pool must hold to keep it all)."""
    from expertmesh.model.config import ModelConfig

    cfg = ModelConfig.from_file(ckpt / "config.json")
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * tokens * (2 if kv_dtype == "bfloat16" else 4)


def _kv_dtype(dtype: str) -> str:
    return "float32" if dtype == "float32" else "bfloat16"


def single_process(ckpt: Path, context: list[int], prompts: list[list[int]], batches: list[int], steps: int,
                   repeats: int, device: str, dtype: str) -> dict:
    """The router code in this process: one in-process shard with the whole context, one group."""
    from expertmesh.actors.context_shard import ContextShard
    from expertmesh.actors.expert_group import ExpertGroup
    from expertmesh.actors.router.router import Router
    from expertmesh.engine.request import Request
    from expertmesh.mesh_spec import MeshSpec
    from expertmesh.model.config import ModelConfig
    from expertmesh.model.sampling import SamplingParams

    placed = {"Router": {"device": device, "dtype": dtype}, "ContextShard": {"device": device},
              "ExpertGroup": {"device": device, "dtype": dtype}}
    cfg = ModelConfig.from_file(ckpt / "config.json")
    specs = [cfg.attention_spec(i) for i in range(cfg.num_layers)]
    cap = 1 << 22
    kvd = _kv_dtype(dtype)
    pool = int(kv_bytes(ckpt, len(context) + 8192, kvd) * 1.1)  # the whole context hot, on the device
    router = Router(MeshSpec(checkpoint=str(ckpt), shard_capacity_tokens=cap, lanes=1, **placed["Router"]),
                    [ContextShard(0, specs, cap, 64, None, None, pool, kvd, **placed["ContextShard"])],
                    [ExpertGroup(str(ckpt), 0, range(cfg.num_experts), **placed["ExpertGroup"])])

    async def run() -> dict:
        runs: dict[str, list[float]] = {"register_s": []}
        warm = await router.register_context(context[:1024], "exact")
        await router.generate(Request(prompts[0], warm.id, SamplingParams(max_new_tokens=4)))
        await router.drop_context(warm.id)
        for i in range(repeats):
            t0 = time.perf_counter()
            ctx = await router.register_context(context, "exact")
            runs["register_s"].append(time.perf_counter() - t0)
            if i < repeats - 1:
                await router.drop_context(ctx.id)
        for b in batches:
            runs[f"decode_b{b}_s"] = []
            for _ in range(repeats):
                res = await asyncio.gather(*(router.generate(Request(p, ctx.id, SamplingParams(max_new_tokens=steps)))
                                             for p in prompts[:b]))
                runs[f"decode_b{b}_s"].append(decode_step(list(res)))
        return best(runs)

    out = asyncio.run(run())
    out.update(throughput(out, batches))
    if device.startswith("cuda"):
        out["cuda_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


def _gpu_memory(stats: dict) -> dict:
    """Per actor: the CUDA memory its stats() reports (any key naming cuda/gpu memory)."""
    out = {}
    for kind in ("shards", "expert_groups"):
        for i, s in enumerate(stats.get(kind, [])):
            found = {k: v for k, v in s.items() if ("cuda" in k or "gpu" in k) and "mem" in k}
            if found:
                out[f"{kind}[{i}]"] = found
    if isinstance(stats.get("router"), dict):
        found = {k: v for k, v in stats["router"].items() if ("cuda" in k or "gpu" in k) and "mem" in k}
        if found:
            out["router"] = found
    return out


def nvidia_smi_per_process() -> dict | str:
    try:
        text = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory",
                               "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20,
                              check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"nvidia-smi: {exc}"
    return {line.split(",")[0].strip(): {"process": line.split(",")[1].strip(),
                                         "used_mib": int(line.split(",")[2])}
            for line in text.strip().splitlines() if line.count(",") == 2}


def mesh_run(ckpt: Path, context: list[int], prompts: list[list[int]], batches: list[int], steps: int,
             repeats: int, device: str, dtype: str, colocate: bool, shards: int, groups: int,
             routers: int = 1, micro_batches: int = 1) -> dict:
    import expertmesh as em

    kwargs = dict(context_shards=shards, expert_groups=groups, device=device, dtype=dtype,
                  data_plane="collective", colocate=colocate, kv_dtype=_kv_dtype(dtype), routers=routers,
                  micro_batches=micro_batches,
                  shard_memory_bytes=int(kv_bytes(ckpt, -(-len(context) // shards) + 8192, _kv_dtype(dtype)) * 1.1),
                  shard_capacity_tokens=-(-len(context) // shards) + 8192)
    mesh = em.Mesh.start(str(ckpt), **kwargs)
    try:
        warm = mesh.register_context(context[:1024])
        mesh.generate(prompts[0], context_id=warm.id, max_new_tokens=4)
        mesh.drop_context(warm.id)
        runs: dict[str, list[float]] = {"register_s": []}
        for i in range(repeats):
            t0 = time.perf_counter()
            ctx = mesh.register_context(context, mode="exact")
            runs["register_s"].append(time.perf_counter() - t0)
            if i < repeats - 1:
                mesh.drop_context(ctx.id)

        def gen(p):
            return mesh.generate(p, context_id=ctx.id, max_new_tokens=steps)

        with ThreadPoolExecutor(max(batches)) as pool:
            for b in batches:
                runs[f"decode_b{b}_s"] = [decode_step(list(pool.map(gen, prompts[:b]))) for _ in range(repeats)]
        out = best(runs)
        out.update(throughput(out, batches))
        stats = mesh.stats()
        out["gpu_memory_per_actor"] = _gpu_memory(stats) or {
            "from": "nvidia-smi (the actors' stats() report no CUDA memory)",
            "per_process": nvidia_smi_per_process() if device.startswith("cuda") else "cpu run"}
        return out
    finally:
        mesh.shutdown()


def hf_run(ckpt: Path, lengths: list[int], batches: list[int], steps: int, repeats: int, device: torch.device,
           dtype: torch.dtype, vocab: int) -> dict:
    """transformers generate with the context in the prompt: prefill seconds and decode tokens/s."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=dtype).to(device).eval()
    rng = np.random.default_rng(1)
    out: dict = {}
    with torch.no_grad():  # warm-up: kernels and caches, outside the timings
        model.generate(torch.tensor(rng.integers(4, vocab - 4, 64), device=device)[None], max_new_tokens=2,
                       do_sample=False, pad_token_id=0)
    for n in lengths:
        ids = torch.tensor(rng.integers(4, vocab - 4, n + 8), device=device)[None]
        cell: dict = {}
        for b in batches:
            batch = ids.repeat(b, 1)
            try:
                first, total = [], []
                for _ in range(repeats):
                    for new, into in ((1, first), (steps, total)):
                        empty_cache(device)
                        t0 = time.perf_counter()
                        with torch.no_grad():
                            model.generate(batch, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                           pad_token_id=0)
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        into.append(time.perf_counter() - t0)
                step = (min(total) - min(first)) / (steps - 1)
                cell[f"b{b}"] = {"prefill_s": min(first), "decode_step_s": step, "decode_tok_s": b / step,
                                 "runs": {"first_token_s": first, "total_s": total}}
            except torch.cuda.OutOfMemoryError as exc:
                cell[f"b{b}"] = {"oom": str(exc).splitlines()[0]}
                empty_cache(device)
                break  # larger batches at this length do not fit either
        out[f"context_{n}"] = cell
    del model
    empty_cache(device)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="the same code on the CPU: tiny model and context, fp32")
    ap.add_argument("--context", type=int, default=None, help="context tokens (default 131072; smoke 512)")
    ap.add_argument("--batches", default=None, help="decode batch sizes (default 1,16,64; smoke 1,4)")
    ap.add_argument("--steps", type=int, default=None, help="decode steps per request (default 32; smoke 4)")
    ap.add_argument("--repeats", type=int, default=None, help="each measure this often (default 2; smoke 1)")
    ap.add_argument("--hf-contexts", default=None, help="HF generate context lengths (default 8192,32768; smoke 256)")
    ap.add_argument("--colocate", action="store_true", help="mesh: one shard + one expert group per actor")
    ap.add_argument("--routers", type=int, default=1, help="mesh: router actors (requests spread over them)")
    ap.add_argument("--micro-batches", type=int, choices=(1, 2), default=1,
                    help="mesh: 2 runs each router step as two halves in ping-pong")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: mesh, single, hf")
    ap.add_argument("--checkpoint", default=None, help="reuse a checkpoint directory built by an earlier run")
    ap.add_argument("--out", default=None, help="default results/gpu.json (smoke: a temporary file)")
    args = ap.parse_args()
    smoke = args.smoke
    context_n = args.context or (512 if smoke else 131072)
    batches = [int(b) for b in (args.batches or ("1,4" if smoke else "1,16,64")).split(",")]
    steps = args.steps or (4 if smoke else 32)
    repeats = args.repeats or (1 if smoke else 2)
    hf_lengths = [int(n) for n in (args.hf_contexts or ("256" if smoke else "8192,32768")).split(",") if n]
    device, dtype = ("cpu", "float32") if smoke else ("cuda", "bfloat16")
    skip = set(filter(None, args.skip.split(",")))
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp()) / "gpu_smoke.json" if smoke
                                           else RESULTS / "gpu.json")

    import ray

    from expertmesh.model.device import resolve_device, resolve_dtype

    tdev = resolve_device(device)  # DeviceError, naming the problem, on a machine without CUDA
    tdtype = resolve_dtype(dtype, tdev)
    values = TINY if smoke else OLMOE_1B_7B
    tmp = Path(tempfile.mkdtemp(prefix="expertmesh-bench-gpu-"))
    t0 = time.perf_counter()
    ckpt = Path(args.checkpoint) if args.checkpoint else build_checkpoint(tmp / "olmoe", values, context_n, tdev,
                                                                          tdtype)
    print(f"checkpoint {ckpt} ({time.perf_counter() - t0:.0f} s)", flush=True)
    rng = np.random.default_rng(0)
    vocab = values["vocab_size"]
    context = rng.integers(4, vocab - 4, context_n).tolist()
    prompts = [rng.integers(4, vocab - 4, 8).tolist() for _ in range(max(batches))]
    gpu = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
           "cuda": torch.version.cuda} if tdev.type == "cuda" else None
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                          "ray": ray.__version__, "gpu": gpu},
              "date": time.strftime("%Y-%m-%d", time.gmtime()),
              "loadavg_1_5_15min": {"before": os.getloadavg()},
              "smoke": smoke, "model": "OLMoE-1B-7B shape, random weights" if not smoke else "tiny OLMoE",
              "model_config": values, "device": device, "dtype": dtype, "context_tokens": context_n,
              "batches": batches, "decode_steps": steps, "repeats": repeats, "colocate": args.colocate,
              "routers": args.routers, "micro_batches": args.micro_batches,
              "statistic": "fastest of the repeats; decode tokens/s = batch / median seconds between tokens",
              "target": "mesh/single decode throughput >= 0.7 at the largest batch"}

    def part(name: str, fn):
        if name in skip:
            return {"skipped": "--skip"}
        print(f"== {name}", flush=True)
        t = time.perf_counter()
        try:
            res = fn()
        except Exception as exc:  # noqa: BLE001 - one part failing keeps the others' figures
            traceback.print_exc()
            res = {"error": f"{type(exc).__name__}: {exc}"}
        res["wall_s"] = time.perf_counter() - t
        print(json.dumps({k: v for k, v in res.items() if k != "runs"}, default=str)[:2000], flush=True)
        return res

    report["single_process"] = part("single", lambda: single_process(ckpt, context, prompts, batches, steps,
                                                                     repeats, device, dtype))
    report["mesh"] = part("mesh", lambda: mesh_run(ckpt, context, prompts, batches, steps, repeats, device, dtype,
                                                   args.colocate, 4, 4, args.routers, args.micro_batches))
    report["hf_generate"] = part("hf", lambda: hf_run(ckpt, hf_lengths, batches, steps, repeats, tdev, tdtype,
                                                      vocab))
    single, mesh = report["single_process"], report["mesh"]
    ratios = {}
    if "register_s" in single and "register_s" in mesh:
        ratios["register_mesh_over_single"] = mesh["register_s"] / single["register_s"]
    for b in batches:
        key = f"decode_b{b}_tok_s"
        if key in single and key in mesh:
            ratios[f"decode_b{b}_throughput_mesh_over_single"] = mesh[key] / single[key]
    report["ratios"] = ratios
    report["loadavg_1_5_15min"]["after"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    for k, v in ratios.items():
        print(f"  ratio {k:<40} {v:6.2f}x")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
