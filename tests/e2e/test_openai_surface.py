"""The OpenAI surface users' tools send, through `expertmesh serve` with the real openai client,
on the built-in model: log-probabilities equal Hugging Face's log_softmax (chat, and completions'
echo as lm-eval's loglikelihood asks), n choices with seeds, prompt batches, logit bias and
min_tokens, stream usage; a field this server does not serve is a 400 that names it."""

from __future__ import annotations

import json

import httpx
import numpy as np
import openai
import pytest
import torch

from expertmesh.model.chat_template import ChatTemplate
from expertmesh.model.default import SHIPPED
from expertmesh.model.tokenizer import ByteTokenizer
from tests.e2e.conftest import KEYS

pytestmark = [pytest.mark.ray, pytest.mark.e2e]
TOK = ByteTokenizer()
QUESTION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is the pass key?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEYS["acme"], max_retries=0)


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(SHIPPED), dtype=torch.float32).eval()


def hf_logprobs(hf, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1).numpy()


def test_chat_logprobs_equal_hf(client, hf):
    res = client.chat.completions.create(model="expertmesh", messages=QUESTION, max_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=3)
    entries = res.choices[0].logprobs.content
    assert len(entries) == res.usage.completion_tokens == 6
    prompt = TOK.encode(ChatTemplate.from_checkpoint(SHIPPED).render(QUESTION))
    assert res.usage.prompt_tokens == len(prompt)  # the checkpoint's own template, rendered as transformers would
    ids = list(prompt)
    for entry in entries:  # greedy: each token is HF's argmax, with HF's log-probability
        ref = hf_logprobs(hf, ids)[-1]
        best = int(ref.argmax())
        assert entry.token == TOK.decode([best]) and abs(entry.logprob - ref[best]) <= 1e-4
        assert [t.token for t in entry.top_logprobs] == [TOK.decode([int(i)]) for i in np.argsort(-ref)[:3]]
        assert np.allclose([t.logprob for t in entry.top_logprobs], np.sort(ref)[::-1][:3], atol=1e-4)
        ids.append(best)


def test_echo_logprobs_of_the_prompt_equal_hf_as_lm_eval_asks(client, hf):
    text = "The quick brown fox jumps over the lazy dog"
    ids = TOK.encode(text)
    res = client.completions.create(model="expertmesh", prompt=ids, max_tokens=1, temperature=0, echo=True,
                                    logprobs=2)
    lp = res.choices[0].logprobs
    assert res.choices[0].text.startswith(text) and len(lp.tokens) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes the first token
    ref = hf_logprobs(hf, ids)
    want = [ref[i - 1, ids[i]] for i in range(1, len(ids))]
    assert np.allclose(lp.token_logprobs[1:len(ids)], want, atol=1e-4)
    assert "".join(lp.tokens[:len(ids)]) == text and lp.text_offset[:3] == [0, 1, 2]
    assert abs(lp.token_logprobs[-1] - ref[-1].max()) <= 1e-4  # the generated token: greedy


def test_n_choices_draw_with_seed_plus_index_and_prompt_batches(client):
    kw = dict(model="expertmesh", max_tokens=8, temperature=1.0)
    both = client.completions.create(prompt="Once upon a time", n=2, seed=5, **kw)
    assert [c.index for c in both.choices] == [0, 1]
    for i, choice in enumerate(both.choices):
        alone = client.completions.create(prompt="Once upon a time", seed=5 + i, **kw)
        assert choice.text == alone.choices[0].text
    assert both.usage.prompt_tokens == len(TOK.encode("Once upon a time"))  # counted once, not per choice
    streamed = {0: "", 1: ""}  # the same choices streamed, interleaved as they come, with echo
    for chunk in client.completions.create(prompt="Once upon a time", n=2, seed=5, stream=True, echo=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == {i: "Once upon a time" + c.text for i, c in enumerate(both.choices)}
    batch = client.completions.create(prompt=["The key is", "Hello"], model="expertmesh", max_tokens=5, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    for prompt, choice in zip(["The key is", "Hello"], batch.choices):
        assert choice.text == client.completions.create(prompt=prompt, model="expertmesh", max_tokens=5,
                                                        temperature=0).choices[0].text


def test_logit_bias_and_min_tokens(client):
    x = TOK.encode("x")[0]
    res = client.chat.completions.create(model="expertmesh", messages=QUESTION, max_tokens=5, temperature=0,
                                         logit_bias={str(x): 100})
    assert res.choices[0].message.content == "xxxxx"
    eos = 2  # the built-in model's
    res = client.completions.create(model="expertmesh", prompt="Hi", max_tokens=10, temperature=0,
                                    logit_bias={str(eos): 100}, extra_body={"min_tokens": 3})
    assert res.choices[0].finish_reason == "stop" and res.usage.completion_tokens == 4  # 3 held back, then eos


def test_stream_usage_chunk_and_streamed_logprobs(client):
    stream = client.chat.completions.create(model="expertmesh", messages=QUESTION, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True}, logprobs=True)
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    streamed = [e.token for c in chunks[:-1] for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    whole = client.chat.completions.create(model="expertmesh", messages=QUESTION, max_tokens=6, temperature=0,
                                           logprobs=True)
    assert streamed == [e.token for e in whole.choices[0].logprobs.content]
    assert "".join(ch.delta.content or "" for c in chunks[:-1] for ch in c.choices) == whole.choices[0].message.content


@pytest.mark.parametrize("field,value", [
    ("functions", [{"name": "f"}]), ("frobnicate", 1), ("suffix", "tail"),
])
def test_a_field_not_served_is_a_400_naming_it(server, field, value):
    path = "/v1/completions" if field == "suffix" else "/v1/chat/completions"
    body = {"model": "expertmesh", "max_tokens": 2, field: value}
    body.update({"prompt": "Hi"} if field == "suffix" else {"messages": QUESTION})
    r = httpx.post(f"{server}{path}", json=body, headers={"Authorization": f"Bearer {KEYS['acme']}"}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"] and err["code"] == "unsupported_parameter"


SCHEMA = {"type": "object", "properties": {"key": {"type": "integer", "minimum": 0, "maximum": 99999},
                                           "word": {"type": "string", "enum": ["red", "green", "blue"]}},
          "required": ["key", "word"], "additionalProperties": False}


def test_structured_output_fits_its_schema(client, server):
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    for temperature in (0.0, 0.7):  # greedy, and sampled twice: every answer parses, fits, and ends there
        res = client.chat.completions.create(model="expertmesh", messages=QUESTION, max_tokens=60, n=2, seed=4,
                                             temperature=temperature, response_format=fmt)
        for choice in res.choices:
            jsonschema.validate(json.loads(choice.message.content), SCHEMA)
            assert choice.finish_reason == "stop"
    # any JSON object (the built-in model's strings run long: bounded by max_tokens, a prefix of an object)
    res = client.completions.create(model="expertmesh", prompt="{", max_tokens=12, temperature=0,
                                    extra_body={"response_format": {"type": "json_object"}})
    assert res.choices[0].text.startswith("{")
    r = httpx.post(f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {KEYS['acme']}"}, timeout=60,
                   json={"model": "expertmesh", "messages": QUESTION, "response_format": {
                       "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nonsense"}}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text


def test_inert_fields_and_bad_combinations(server):
    h = {"Authorization": f"Bearer {KEYS['acme']}"}
    ok = httpx.post(f"{server}/v1/chat/completions", headers=h, timeout=60, json={
        "model": "expertmesh", "messages": QUESTION, "max_completion_tokens": 2, "user": "u1", "store": False,
        "response_format": {"type": "text"}, "tool_choice": "none"})  # text: no grammar
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2  # max_completion_tokens counts
    r = httpx.post(f"{server}/v1/chat/completions", headers=h, timeout=60, json={
        "model": "expertmesh", "messages": QUESTION, "max_tokens": 2, "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    r = httpx.post(f"{server}/v1/completions", headers=h, timeout=60, json={
        "model": "expertmesh", "prompt": "Hi", "max_tokens": 2, "stream_options": {"include_usage": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"
    r = httpx.post(f"{server}/v1/chat/completions", headers=h, timeout=60, json={
        "model": "expertmesh", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]})
    assert r.status_code == 400 and "messages" in json.dumps(r.json())
    for field, value in (("logit_bias", {"999999": 5}), ("stop_token_ids", [999999])):  # outside the vocabulary
        r = httpx.post(f"{server}/v1/completions", headers=h, timeout=60, json={
            "model": "expertmesh", "prompt": "Hi", "max_tokens": 2, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field and "999999" in r.text, r.text


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Oslo", "Rome"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}


def test_tool_calls_forced_by_name_and_required(client):
    """A named function and 'required' are drawn under the tools' schemas: the calls parse and fit,
    streamed or not; the conversation goes on with the tool's answer."""
    import jsonschema

    chosen = {"type": "function", "function": {"name": "get_weather"}}
    res = client.chat.completions.create(model="expertmesh", messages=QUESTION, max_tokens=60, temperature=0,
                                         tools=[WEATHER, TIME], tool_choice=chosen)
    msg, choice = res.choices[0].message, res.choices[0]
    assert choice.finish_reason == "stop" and msg.content is None and len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    chunks = list(client.chat.completions.create(model="expertmesh", messages=QUESTION, max_tokens=60,
                                                 temperature=0, tools=[WEATHER, TIME], tool_choice=chosen,
                                                 stream=True))
    deltas = [d for c in chunks for ch in c.choices for d in (ch.delta.tool_calls or [])]
    assert [(d.function.name, d.function.arguments) for d in deltas] == [("get_weather", call.function.arguments)]
    assert chunks[-1].choices[0].finish_reason == "stop"
    res = client.chat.completions.create(model="expertmesh", messages=QUESTION, max_tokens=64, temperature=0.8,
                                         seed=2, n=2, tools=[WEATHER, TIME], tool_choice="required",
                                         parallel_tool_calls=False)  # one call: byte tokens, 64 at most
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for choice in res.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
        assert len(choice.message.tool_calls) == 1
        for c in choice.message.tool_calls:
            jsonschema.validate(json.loads(c.function.arguments), schemas[c.function.name])
    # the conversation goes on: the assistant's call and the tool's answer are rendered by the template
    more = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    res = client.chat.completions.create(model="expertmesh", messages=more, max_tokens=4, temperature=0,
                                         tools=[WEATHER], tool_choice="none")
    assert res.choices[0].message.content and res.choices[0].message.tool_calls is None


def test_tools_that_cannot_be_served_are_400s_naming_the_field(server):
    h = {"Authorization": f"Bearer {KEYS['acme']}"}

    def post(**extra):
        r = httpx.post(f"{server}/v1/chat/completions", headers=h, timeout=60,
                       json={"model": "expertmesh", "messages": QUESTION, "max_tokens": 4, **extra})
        return r.status_code, r.json().get("error", {})

    status, err = post(tools=[WEATHER])  # auto: the built-in template does not show tools to the model
    assert status == 400 and err["param"] == "tool_choice" and "does not show tools" in err["message"]
    status, err = post(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert status == 400 and err["param"] == "tool_choice" and "get_time" in err["message"]
    status, err = post(tool_choice="required")
    assert status == 400 and err["param"] == "tool_choice"
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}
    status, err = post(tools=[bad], tool_choice="required")
    assert status == 400 and err["param"] == "tools" and err["code"] == "invalid_tools", err
    status, err = post(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"})
    assert status == 400 and err["param"] == "response_format"
    status, err = post(tools=[{"type": "function", "function": {"name": "has space"}}], tool_choice="none")
    assert status == 400 and err["param"].startswith("tools")
    status, _ = post(tools=[WEATHER], tool_choice="none", parallel_tool_calls=False)
    assert status == 200


def test_a_context_registered_as_messages_is_continued_by_a_chat(client, server, hf):
    """POST /v1/contexts with messages (rendered with no generation prompt); a chat over it is the
    context's messages and the request's, computed over the registered KV: Hugging Face's tokens
    and log-probabilities over the whole rendered conversation."""
    h = {"Authorization": f"Bearer {KEYS['acme']}"}
    doc = [{"role": "system", "content": "The pass key is 40721. Keep it in mind; it is asked for later."}]
    r = httpx.post(f"{server}/v1/contexts", headers=h, timeout=120, json={"messages": doc, "name": "a conversation"})
    assert r.status_code == 201 and r.json()["chat"] is True, r.text
    ctx = r.json()
    template = ChatTemplate.from_checkpoint(SHIPPED)
    assert ctx["num_tokens"] == len(TOK.encode(template.render(doc, add_generation_prompt=False)))
    try:
        question = [{"role": "user", "content": "What is the pass key?"}]
        res = client.chat.completions.create(model="expertmesh", messages=question, max_tokens=6, temperature=0,
                                             logprobs=True, extra_body={"context_id": ctx["id"]})
        ids = TOK.encode(template.render(doc + question))  # the whole conversation, as transformers renders it
        assert res.usage.prompt_tokens == len(ids) - ctx["num_tokens"] and res.usage.context_tokens == ctx["num_tokens"]
        for entry in res.choices[0].logprobs.content:
            ref = hf_logprobs(hf, ids)[-1]
            best = int(ref.argmax())
            assert entry.token == TOK.decode([best]) and abs(entry.logprob - ref[best]) <= 1e-4
            ids.append(best)
        r = httpx.post(f"{server}/v1/completions", headers=h, timeout=60, json={
            "model": "expertmesh", "prompt": "Hi", "max_tokens": 1, "echo": True, "context_id": ctx["id"]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "echo"
        r = httpx.post(f"{server}/v1/contexts", headers=h, timeout=60, json={"messages": doc, "text": "x"})
        assert r.status_code == 400 and "exactly one of text, token_ids or messages" in r.text
    finally:
        httpx.delete(f"{server}/v1/contexts/{ctx['id']}", headers=h, timeout=60)


def test_a_background_registration_reports_progress_then_the_context(server):
    """POST /v1/contexts with background: true answers 202 at once; GET .../registration reports
    tokens done, tokens/s and the time left, then the context; another tenant sees nothing."""
    import time

    h = {"Authorization": f"Bearer {KEYS['acme']}"}
    text = "The harbour closed in 1932 and the lamp was automated. " * 40
    r = httpx.post(f"{server}/v1/contexts", headers=h, timeout=60, json={"text": text, "background": True})
    assert r.status_code == 202 and r.json()["status"] == "registering", r.text
    cid, where = r.json()["id"], r.headers["location"]
    assert where == f"/v1/contexts/{cid}/registration" and r.json()["num_tokens"] == len(text.encode())
    seen, deadline = [], time.monotonic() + 120
    while True:
        got = httpx.get(f"{server}{where}", headers=h, timeout=60)
        if got.status_code == 200:  # the router lists it as soon as it starts
            seen.append(got.json())
            if seen[-1]["status"] != "registering":
                break
        assert time.monotonic() < deadline, seen[-3:]
        time.sleep(0.05)
    try:
        last = seen[-1]
        assert last["status"] == "ready" and last["tokens_done"] == last["num_tokens"] == len(text.encode())
        assert last["context"]["id"] == cid and last["context"]["num_tokens"] == last["num_tokens"]
        assert [s["tokens_done"] for s in seen] == sorted(s["tokens_done"] for s in seen)
        other = httpx.get(f"{server}{where}", headers={"Authorization": f"Bearer {KEYS['globex']}"}, timeout=60)
        assert other.status_code == 404
        assert httpx.get(f"{server}/v1/contexts/ctx-none/registration", headers=h, timeout=60).status_code == 404
    finally:
        httpx.delete(f"{server}/v1/contexts/{cid}", headers=h, timeout=60)
