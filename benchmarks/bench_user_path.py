"""The user's path: `Mesh.generate` called from a driver, against Hugging Face transformers with a
prefix cache, same model, same machine, same run.

Hugging Face side: the 16K-token context is prefilled once into a `DynamicCache`; each request
copies it (a prefix-cache hit), feeds its prompt and decodes greedily one token per forward
(batch 16: the cache repeated over the batch, 16 prompts of one length). Mesh side: the context
registered once; requests through `Mesh.generate` from the driver (batch 16: 16 driver threads
at once), so scheduling, sampling and the results' way back through Ray all count.
Decode step = (wall - time to first token) / (tokens - 1), wall measured by the caller; the
median over a batch's requests, the fastest of `--repeats` on each side; Hugging Face is measured
again just before each layout (the machine is a shared VM whose speed drifts).

Layouts: "default" = what `Mesh.start()` picks on this machine with no layout arguments; the
others name their arguments. Writes benchmarks/results/user_path.json.

    python benchmarks/bench_user_path.py [--context 16384] [--steps 32] [--layouts default,...]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
LAYOUTS = {
    "default": {},
    "4+2": {"context_shards": 4, "expert_groups": 2, "colocate": False},
    "colocated-2": {"context_shards": 2, "expert_groups": 2, "colocate": True},
}


def step_time(wall: float, ttft: float, tokens: int) -> float:
    return (wall - ttft) / (tokens - 1)


class HuggingFace:
    """transformers' model with a prefilled prefix cache of the context."""

    def __init__(self, ckpt: Path, context: list[int]) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
        with torch.inference_mode():
            out = self.model(torch.tensor([context]), use_cache=True)
        self.cache = out.past_key_values

    def _decode(self, prompts: list[list[int]], steps: int) -> float:
        with torch.inference_mode():
            cache = copy.deepcopy(self.cache)
            if len(prompts) > 1:
                cache.batch_repeat_interleave(len(prompts))
            t0 = time.perf_counter()
            logits = self.model(torch.tensor(prompts), past_key_values=cache, use_cache=True).logits
            tok = logits[:, -1].argmax(-1, keepdim=True)
            ttft = time.perf_counter() - t0
            for _ in range(steps - 1):
                logits = self.model(tok, past_key_values=cache, use_cache=True).logits
                tok = logits[:, -1].argmax(-1, keepdim=True)
            return step_time(time.perf_counter() - t0, ttft, steps)

    def measure(self, prompts: list[list[int]], steps: int, repeats: int) -> dict:
        self._decode(prompts[:1], 4)  # warm up
        runs = {"decode_b1_s": [self._decode(prompts[:1], steps) for _ in range(repeats)],
                "decode_b16_s": [self._decode(prompts, steps) for _ in range(repeats)]}
        return {**{k: min(v) for k, v in runs.items()}, "runs": runs}


def mesh_measure(ckpt: Path, context: list[int], prompts: list[list[int]], steps: int, repeats: int,
                 layout: str) -> dict:
    import expertmesh as em

    mesh = em.Mesh.start(str(ckpt), **LAYOUTS[layout])
    try:
        picked = {"context_shards": len(mesh.shards), "expert_groups": len(mesh.groups),
                  "colocate": mesh.colocated, "routers": len(mesh.routers)}
        ctx = mesh.register_context(context, mode="exact")
        mesh.generate(prompts[0], context_id=ctx.id, max_new_tokens=4)  # warm up

        def one(p: list[int]) -> float:
            t0 = time.perf_counter()
            res = mesh.generate(p, context_id=ctx.id, max_new_tokens=steps)
            wall = time.perf_counter() - t0
            # the built-in model may end a random prompt's output with eos: time the tokens it made
            assert res.completion_tokens >= 2, (res.completion_tokens, res.finish_reason)
            return step_time(wall, res.ttft_s, res.completion_tokens)

        runs: dict[str, list[float]] = {"decode_b1_s": [], "decode_b16_s": []}
        with ThreadPoolExecutor(len(prompts)) as pool:
            for _ in range(repeats):
                runs["decode_b1_s"].append(one(prompts[0]))
                runs["decode_b16_s"].append(statistics.median(pool.map(one, prompts)))
        return {**{k: min(v) for k, v in runs.items()}, "runs": runs, "layout": picked}
    finally:
        mesh.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--out", default=str(RESULTS / "user_path.json"))
    args = ap.parse_args()

    import ray

    from expertmesh.model.default import default_checkpoint

    rng = np.random.default_rng(0)
    ckpt = Path(default_checkpoint())
    context = rng.integers(4, 260, args.context).tolist()
    prompts = [rng.integers(4, 260, 8).tolist() for _ in range(16)]
    hf = HuggingFace(ckpt, context)
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                          "ray": ray.__version__},
              "date": time.strftime("%Y-%m-%d", time.gmtime()), "loadavg_1_5_15min": {"before": os.getloadavg()},
              "model": "default (built-in)", "context_tokens": args.context, "decode_steps": args.steps,
              "repeats": args.repeats, "statistic": "fastest of the repeats; batch 16: median over its requests",
              "step": "(wall - ttft) / (tokens - 1), wall measured by the caller",
              "targets": {"decode_b1_mesh_over_hf": 1.5, "decode_b16_mesh_over_hf": 0.25},
              "layouts": {}}
    for layout in args.layouts.split(","):
        base = hf.measure(prompts, args.steps, args.repeats)
        mesh = mesh_measure(ckpt, context, prompts, args.steps, args.repeats, layout)
        ratios = {"decode_b1_mesh_over_hf": mesh["decode_b1_s"] / base["decode_b1_s"],
                  "decode_b16_mesh_over_hf": mesh["decode_b16_s"] / base["decode_b16_s"]}
        report["layouts"][layout] = {"args": LAYOUTS[layout], "hf_prefix_cache": base, "mesh": mesh, "ratios": ratios}
        print(f"{layout:<12} {mesh['layout']}  HF b1 {base['decode_b1_s'] * 1e3:6.2f} ms  b16 "
              f"{base['decode_b16_s'] * 1e3:6.2f} ms | mesh b1 {mesh['decode_b1_s'] * 1e3:6.2f} ms  b16 "
              f"{mesh['decode_b16_s'] * 1e3:6.2f} ms | {ratios['decode_b1_mesh_over_hf']:.2f}x "
              f"{ratios['decode_b16_mesh_over_hf']:.2f}x", flush=True)
    report["loadavg_1_5_15min"]["after"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
