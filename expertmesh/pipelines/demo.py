"""The main job (`make demo`): a long shared context on the mesh, several questions over it.

Starts a local Ray cluster, loads the embedded default model, registers a generated
passkey haystack, answers questions concurrently and prints pathway and timing.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from expertmesh.pipelines.tasks import passkey


def run(context_tokens: int = 16384, context_shards: int = 4, expert_groups: int = 2,
        checkpoint: str | None = None, address: str | None = None, mode: str = "exact") -> None:
    import expertmesh as em

    t0 = time.perf_counter()
    mesh = em.Mesh.start(checkpoint=checkpoint, context_shards=context_shards, expert_groups=expert_groups,
                         address=address)
    print(f"mesh up in {time.perf_counter() - t0:.1f}s: {mesh.config.architecture}, "
          f"{mesh.config.num_layers} layers, {mesh.config.num_experts} experts, "
          f"{context_shards} context shards, {expert_groups} expert groups ({mesh.checkpoint})")
    try:
        tasks = [passkey(context_tokens, key, depth) for key, depth in ((40213, 0.3),)]
        ids = mesh.tokenizer.encode(tasks[0].context)[:context_tokens]
        t0 = time.perf_counter()
        ctx = mesh.register_context(ids, mode=mode)
        print(f"registered context {ctx.id}: {ctx.num_tokens:,} tokens over shards {list(ctx.shards)} "
              f"({mode}) in {time.perf_counter() - t0:.2f}s")
        questions = [
            (tasks[0].prompt, None),
            (" Repeat the first sentence:", None),
            (tasks[0].prompt, 1),
        ]

        def ask(q):
            prompt, top = q
            return mesh.generate(mesh.tokenizer.encode(prompt), context_id=ctx.id, max_new_tokens=16,
                                 top_shards=top)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(questions)) as pool:  # concurrent requests share router steps
            results = list(pool.map(ask, questions))
        wall = time.perf_counter() - t0
        for (prompt, top), res in zip(questions, results):
            print(f"\nQ:{prompt!r} (top_shards={top})\nA:{res.text!r}")
            print(f"   ttft {res.ttft_s * 1e3:.0f} ms, {res.completion_tokens} tokens in {res.total_s:.2f}s, "
                  f"shards visited {res.pathway['shards']}, tokens per expert group "
                  f"{res.pathway['expert_group_tokens']}")
        out = sum(r.completion_tokens for r in results)
        print(f"\n{len(results)} concurrent requests: {out} tokens in {wall:.2f}s ({out / wall:.1f} tokens/s)")
        print(f"expected passkey answer: {tasks[0].answer!r}")
        mesh.drop_context(ctx.id)
    finally:
        mesh.shutdown()
