"""Generation ends on the model's eos token: `finish_reason == "stop"` through the mesh and the
HTTP API (what the demo relies on once the built-in model ends its answers with eos).

A tiny random Llama-4 checkpoint whose config names as eos the token it greedily generates
first: so its first generated token is eos.
"""

from __future__ import annotations

import json
import shutil

import openai
import pytest

from expertmesh.model.tokenizer import ByteTokenizer
from tests.conftest import VOCAB
from tests.e2e.serving import serve_process

pytestmark = [pytest.mark.ray, pytest.mark.e2e]
PROMPT = "The pass key is"


@pytest.fixture(scope="module")
def eos_checkpoint(ray_cluster, tiny_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("eos-model")
    shutil.copytree(tiny_checkpoint("llama4"), path, dirs_exist_ok=True)
    first = _greedy(path, ByteTokenizer(vocab_size=VOCAB).encode(PROMPT))
    cfg = json.loads((path / "config.json").read_text())
    cfg["eos_token_id"] = first
    (path / "config.json").write_text(json.dumps(cfg))
    return path, first


def _greedy(path, ids: list[int]) -> int:
    """The first token greedy decoding picks after `ids` (the single-process model)."""
    import expertmesh as em

    mesh = em.Mesh.start(str(path), context_shards=1, expert_groups=1)
    try:
        return mesh.generate(ids, max_new_tokens=1).token_ids[0]
    finally:
        mesh.shutdown()


def test_mesh_finishes_on_eos_with_stop(ray_cluster, eos_checkpoint):
    import expertmesh as em

    path, eos = eos_checkpoint
    mesh = em.Mesh.start(str(path), context_shards=2, expert_groups=1)
    try:
        assert eos in mesh.config.eos_token_id
        res = mesh.generate(ByteTokenizer(vocab_size=VOCAB).encode(PROMPT), max_new_tokens=20)
        assert res.finish_reason == "stop" and res.token_ids == [eos] and res.completion_tokens == 1
        on = mesh.generate(ByteTokenizer(vocab_size=VOCAB).encode(PROMPT), max_new_tokens=5, ignore_eos=True)
        assert on.finish_reason == "length" and on.token_ids[0] == eos and len(on.token_ids) == 5
    finally:
        mesh.shutdown()


def test_http_finish_reason_stop_on_eos(eos_checkpoint, tmp_path):
    path, _ = eos_checkpoint
    with serve_process(path, tmp_path, "--context-shards", "1", "--expert-groups", "1") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        res = client.completions.create(model="expertmesh", prompt=PROMPT, max_tokens=20, temperature=0)
        assert res.choices[0].finish_reason == "stop" and res.usage.completion_tokens == 1
        finish = [c.choices[0].finish_reason for c in client.completions.create(
            model="expertmesh", prompt=PROMPT, max_tokens=20, temperature=0, stream=True) if c.choices]
        assert finish[-1] == "stop"
        with pytest.raises(openai.BadRequestError) as err:  # a checkpoint without a chat template: said, not guessed
            client.chat.completions.create(model="expertmesh", messages=[{"role": "user", "content": "Hi"}])
        assert err.value.body["code"] == "no_chat_template"
