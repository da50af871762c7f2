"""The main job (`make demo`): two tenants query a long shared context through the HTTP API.

Starts a local Ray cluster and the Ray Serve app on the embedded default model, registers a
long shared context (tenant acme) and a private one (tenant globex), asks questions with the
`openai` client (one streaming) and prints answers, time to first token, tokens/s and pathways.
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import socket
import time
from pathlib import Path

from expertmesh.pipelines.evaluate import make_task

GENEROUS_MAX_TOKENS = 64  # with a model that ends its answers with eos


def stops_after_answer(checkpoint: str | None) -> bool:
    """Whether the model was trained to end its answers with eos (its training.json says so:
    scripts/train_demo_model_v2.sh install marks it). Only then does the demo ask with a generous
    max_tokens and rely on the stop; otherwise it asks for exactly the answer's length, since a
    model without that training runs on with junk after the answer."""
    from expertmesh.model.default import default_checkpoint

    path = default_checkpoint() if checkpoint is None else Path(checkpoint.removeprefix("file://"))
    summary = path / "training.json"
    try:
        return bool(json.loads(summary.read_text()).get("eos_after_answer"))
    except (OSError, ValueError):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _layout() -> str:
    """The serving mesh's layout, as its replicas started it."""
    from expertmesh.pipelines.serve_settings import ServeSettings
    from expertmesh.platform.mesh import Mesh

    mesh = Mesh.attach(ServeSettings().mesh_name)
    return (f"{len(mesh.shards)} context shards, {len(mesh.groups)} expert groups"
            + (", colocated" if mesh.colocated else ""))


def run(context_tokens: int = 16384, context_shards: int | None = None, expert_groups: int | None = None,
        checkpoint: str | None = None, address: str | None = None, mode: str = "exact",
        store: str | None = None, shard_backend: str = "torch", expert_backend: str = "torch",
        device: str = "auto", dtype: str = "auto", colocate: bool | None = None, data_plane: str = "collective",
        routers: int = 1) -> None:
    import httpx
    import openai
    import ray
    from ray import serve

    from expertmesh.pipelines.serve import build_app
    from expertmesh.platform.cluster import connect

    keys = {name: secrets.token_urlsafe(16) for name in ("acme", "globex")}
    tenants = {"tenants": [{"name": n, "api_key_sha256": hashlib.sha256(k.encode()).hexdigest(),
                            "max_concurrent_requests": 8, "tokens_per_minute": 1_000_000,
                            "max_context_tokens": 4 * context_tokens} for n, k in keys.items()]}
    t0 = time.perf_counter()
    started = connect(address, context_shards, expert_groups)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"checkpoint": checkpoint, "context_shards": context_shards,
                         "expert_groups": expert_groups, "tenants": tenants, "store": store,
                         "shard_backend": shard_backend, "expert_backend": expert_backend, "device": device,
                         "dtype": dtype, "colocate": colocate, "data_plane": data_plane, "routers": routers}),
              name="expertmesh",
              route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    print(f"server up in {time.perf_counter() - t0:.1f}s at {url}/v1 "
          f"({_layout()})")
    try:
        acme, globex = ({"Authorization": f"Bearer {keys[n]}"} for n in ("acme", "globex"))
        # sized as RULER counts: context + question + answer = the stated length
        task = make_task("passkey", context_tokens, 3, 10, random.Random(0))
        private = make_task("passkey", context_tokens // 4, 5, 10, random.Random(1))
        t0 = time.perf_counter()
        shared = httpx.post(f"{url}/v1/contexts", headers=acme, timeout=600, json={
            "text": task.context, "mode": mode, "visibility": "shared", "name": "haystack"}).json()
        print(f"acme registered shared context {shared['id']}: {shared['num_tokens']:,} tokens over shards "
              f"{shared['shards']} ({mode}) in {time.perf_counter() - t0:.2f}s")
        t0 = time.perf_counter()
        mine = httpx.post(f"{url}/v1/contexts", headers=globex, timeout=600, json={
            "text": private.context, "visibility": "private", "name": "globex-notes"}).json()
        print(f"globex registered private context {mine['id']}: {mine['num_tokens']:,} tokens "
              f"in {time.perf_counter() - t0:.2f}s")

        clients = {n: openai.OpenAI(base_url=f"{url}/v1", api_key=k, max_retries=0) for n, k in keys.items()}
        stops = stops_after_answer(checkpoint)
        asks = [("acme", shared["id"], task.prompt, task.answer),
                ("globex", shared["id"], task.prompt, task.answer),
                ("globex", mine["id"], private.prompt, private.answer)]
        for i, (tenant, ctx, prompt, answer) in enumerate(asks):
            stream = i == 1
            t0 = time.perf_counter()
            max_tokens = GENEROUS_MAX_TOKENS if stops else len(answer.encode())
            kw = dict(model="expertmesh", prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                      extra_body={"context_id": ctx})
            if stream:
                ttft, text, usage, pathway, finish = None, "", None, {}, None
                for chunk in clients[tenant].completions.create(stream=True, **kw):
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    text += chunk.choices[0].text if chunk.choices else ""
                    finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
                    usage = chunk.usage or usage
                    pathway = chunk.model_extra.get("pathway") or pathway
                n_out = usage.completion_tokens if usage else 0
            else:
                res = clients[tenant].completions.create(**kw)
                ttft, text, n_out, pathway = None, res.choices[0].text, res.usage.completion_tokens, \
                    res.model_extra["pathway"]
                finish = res.choices[0].finish_reason
            wall = time.perf_counter() - t0
            print(f"\n[{tenant}{' stream' if stream else ''}] Q:{prompt[-60:]!r}\n  A:{text!r} (expected {answer!r}"
                  f"{', finish_reason ' + repr(finish) if stops else ''})")
            print(f"  {'ttft %.0f ms, ' % (ttft * 1e3) if ttft else ''}{n_out} tokens in {wall:.2f}s "
                  f"({n_out / wall:.1f} tokens/s), shards {pathway.get('shards')}, tokens per expert group "
                  f"{pathway.get('expert_group_tokens')}")
        r = httpx.get(f"{url}/v1/contexts/{mine['id']}", headers=acme)
        print(f"\nacme asking for globex's private context: HTTP {r.status_code} ({r.json()['error']['message']})")
    finally:
        if started:  # Serve's actors end with the cluster this demo started (serve.shutdown() here kills
            ray.shutdown()  # its controller under its own graceful_shutdown task: a raylet warning)
        else:  # a joined cluster lives on: stop Serve's controller and proxies in it
            serve.shutdown()
