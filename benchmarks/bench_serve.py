"""Serving benchmark: the HTTP API over a registered context vs re-reading the context per request.

Same model (the embedded default), same machine, same run:
  - time to first token for a question over a registered 32K-token context (streaming HTTP,
    measured by the client) against two baselines that read the whole context with the question
    (what a server without a shared context pool does for every request):
      (a) `transformers` `generate` (max_new_tokens=1) with the context in the prompt;
      (b) expertmesh's own single-process prefill of the same tokens: `model(ids)` of
          `expertmesh.model` in this process, no Ray (the faster of the two);
  - aggregate output tokens/s with 1, 8 and 32 concurrent streams.
Writes benchmarks/results/serve.json (with the machine's load average before and after).

    python benchmarks/bench_serve.py [--context 32768] [--seconds 20]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
KEY = "bench-key"


def hf_ttft(ckpt: Path, ids: list[int], repeats: int) -> list[float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(torch.tensor([ids]), max_new_tokens=1, do_sample=False, pad_token_id=0)
        times.append(time.perf_counter() - t0)
    return times


def own_prefill(ckpt: Path, ids: list[int], repeats: int) -> list[float]:
    """Seconds to the first token with expertmesh's single-process model: one forward of all tokens."""
    from expertmesh.model import load_model

    model = load_model(ckpt).requires_grad_(False)
    model(torch.tensor(ids[:512]))  # warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        int(model(torch.tensor(ids))[-1].argmax())
        times.append(time.perf_counter() - t0)
    return times


def stream(url: str, body: dict) -> tuple[float, int]:
    """(seconds to the first token, completion tokens) of one streaming completion."""
    import httpx

    t0, first, tokens = time.perf_counter(), None, 0
    with httpx.stream("POST", f"{url}/v1/completions", json=dict(body, stream=True), timeout=600,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"][0]["text"]:
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return (first if first is not None else time.perf_counter() - t0), tokens


def throughput(url: str, streams: int, seconds: float, max_tokens: int) -> dict:
    done: list[int] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client(k: int) -> None:
        n = 0
        while time.perf_counter() < stop:
            _, tokens = stream(url, {"model": "expertmesh", "prompt": f"stream {k} turn {n}:",
                                     "max_tokens": max_tokens, "temperature": 0.8, "seed": k * 1000 + n})
            with lock:
                done.append(tokens)
            n += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"streams": streams, "requests": len(done), "tokens": sum(done), "seconds": wall,
            "tokens_per_s": sum(done) / wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--seconds", type=float, default=20.0, help="per throughput level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--hf-repeats", type=int, default=2, help="runs of each baseline (the fastest counts)")
    ap.add_argument("--out", default=str(RESULTS / "serve.json"))
    args = ap.parse_args()

    import httpx
    import ray
    from ray import serve

    from expertmesh.model.default import default_checkpoint
    from expertmesh.pipelines.serve import build_app
    from expertmesh.pipelines.tasks import passkey
    from expertmesh.platform.cluster import connect

    ckpt = default_checkpoint()
    task = passkey(args.context, 31337, 0.5)
    ctx_ids = [b + 4 for b in task.context.encode()][: args.context]
    question = [b + 4 for b in task.prompt.encode()]
    report: dict = {"context_tokens": len(ctx_ids), "question_tokens": len(question), "model": "default",
                    "date": time.strftime("%Y-%m-%d", time.gmtime()), "cpus": os.cpu_count(),
                    "loadavg_1_5_15min": {"before": os.getloadavg()}}

    hf = hf_ttft(ckpt, ctx_ids + question, args.hf_repeats)
    report["hf_generate_ttft_s"] = {"median": statistics.median(hf), "fastest": min(hf), "runs": hf}
    print(f"HF generate, context in the prompt: ttft {min(hf) * 1e3:.0f} ms (fastest of {len(hf)})")
    own = own_prefill(ckpt, ctx_ids + question, args.hf_repeats)
    report["single_process_prefill_s"] = {"median": statistics.median(own), "fastest": min(own), "runs": own}
    print(f"expertmesh single-process prefill of the same tokens: {min(own) * 1e3:.0f} ms (fastest of {len(own)})")

    connect(None, 4, 2)
    serve.start(http_options={"host": "127.0.0.1", "port": 8765})
    tenants = {"tenants": [{"name": "bench", "api_key_sha256": hashlib.sha256(KEY.encode()).hexdigest(),
                            "max_concurrent_requests": 64, "tokens_per_minute": 10**9,
                            "max_context_tokens": 10**9}]}
    serve.run(build_app({"context_shards": 4, "expert_groups": 2, "tenants": tenants, "max_queue": 128}),
              name="expertmesh", route_prefix="/")
    url = "http://127.0.0.1:8765"
    try:
        t0 = time.perf_counter()
        ctx = httpx.post(f"{url}/v1/contexts", headers={"Authorization": f"Bearer {KEY}"}, timeout=900,
                         json={"token_ids": ctx_ids, "mode": "exact", "visibility": "shared"}).json()
        report["register_s"] = time.perf_counter() - t0
        body = {"model": "expertmesh", "prompt": question, "max_tokens": 4, "temperature": 0.0,
                "context_id": ctx["id"]}
        stream(url, body)  # warm up
        ttfts = [stream(url, body)[0] for _ in range(10)]
        report["mesh_http_ttft_s"] = {"median": statistics.median(ttfts), "runs": ttfts}
        # the baselines' fastest run against the mesh's median: the speed-ups are not flattered
        report["ttft_speedup_vs_hf"] = min(hf) / statistics.median(ttfts)
        report["ttft_speedup_vs_single_process_prefill"] = min(own) / statistics.median(ttfts)
        print(f"expertmesh over the registered context: ttft {statistics.median(ttfts) * 1e3:.0f} ms "
              f"-> {report['ttft_speedup_vs_hf']:.0f}x faster than HF generate, "
              f"{report['ttft_speedup_vs_single_process_prefill']:.0f}x faster than its own single-process "
              f"prefill (registration once: {report['register_s']:.1f}s)")
        levels = [throughput(url, n, args.seconds, args.max_tokens) for n in (1, 8, 32)]
        report["throughput"] = levels
        base = levels[0]["tokens_per_s"]
        report["throughput_ratio_vs_1_stream"] = {str(lv["streams"]): lv["tokens_per_s"] / base for lv in levels}
        for lv in levels:
            print(f"{lv['streams']:>3} streams: {lv['tokens_per_s']:7.1f} tokens/s "
                  f"({lv['tokens_per_s'] / base:.1f}x one stream, {lv['requests']} requests)")
    finally:
        serve.shutdown()
        ray.shutdown()
    report["loadavg_1_5_15min"]["after"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
