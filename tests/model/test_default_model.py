import random

import pytest
import torch

from expertmesh.model import default, load_model
from expertmesh.model.default import default_checkpoint
from expertmesh.model.tokenizer import ByteTokenizer
from expertmesh.pipelines.evaluate import make_task

SHIPPED = default.SHIPPED  # before any test patches it


def test_default_model_is_deterministic_and_matches_hf(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("EXPERTMESH_CACHE", str(tmp_path))
    path = default_checkpoint()
    model = load_model(path)
    assert model.cfg.architecture == "Llama4ForCausalLM"
    assert model.cfg.chunk_size[-1] is None and all(model.cfg.chunk_size[:-1])
    ids = torch.randint(4, 260, (4500,), generator=torch.Generator().manual_seed(0))  # spans 3 chunks of 2048
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids[None]).logits[0]
    # the trained model's logits reach ~30: compare relative to each row's scale (fp32 rounding),
    # and greedy choices exactly
    scale = ours.abs().amax(dim=-1, keepdim=True).clamp(min=1.0)
    assert ((ours - theirs).abs() / scale).max() <= 1e-4
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_without_the_shipped_model_a_deterministic_random_init_is_cached(tmp_path, monkeypatch):
    """The fallback path: no shipped checkpoint -> the same seeded init in every cache (every host)."""
    monkeypatch.setattr(default, "SHIPPED", tmp_path / "not-shipped")
    states = []
    for cache in ("a", "b"):
        monkeypatch.setenv("EXPERTMESH_CACHE", str(tmp_path / cache))
        path = default_checkpoint()
        assert path.is_relative_to(tmp_path / cache) and (path / "model.safetensors").is_file()
        assert default_checkpoint() == path  # written once, then reused
        states.append(load_model(path).state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    shipped = load_model(SHIPPED).state_dict()
    assert not all(torch.equal(shipped[k], states[0][k]) for k in shipped)  # really the random init


def _greedy_answers(model, tok, task) -> bool:
    """Whether greedy decoding after context + question yields exactly the answer's tokens: one
    teacher-forced forward, the argmax at every answer position equal to the answer's next token."""
    prompt, answer = tok.encode(task.context + task.prompt), tok.encode(task.answer)
    logits = model(torch.tensor(prompt + answer))  # [T, V]
    greedy = logits[len(prompt) - 1:-1].argmax(-1).tolist()
    return greedy == answer


@pytest.mark.parametrize("depth", [0, 2, 4])
def test_shipped_model_answers_a_passkey_question(depth):
    """The demo model's claim, cheaply: the passkey question over ~1.9K tokens, needle at 0/50/100%."""
    assert default_checkpoint() == SHIPPED
    model = load_model(SHIPPED).requires_grad_(False)
    task = make_task("passkey", 1900, depth, 5, random.Random(7))  # ends before the first 2048-token chunk
    assert _greedy_answers(model, ByteTokenizer(), task), task.answer


def test_shipped_model_answers_the_demo_questions():
    """`make demo`'s two questions (pipelines/demo.py): the passkeys in its 16K shared context and
    in the 4K private one."""
    model = load_model(SHIPPED).requires_grad_(False)
    tok = ByteTokenizer()
    shared = make_task("passkey", 16384, 3, 10, random.Random(0))
    private = make_task("passkey", 16384 // 4, 5, 10, random.Random(1))
    assert _greedy_answers(model, tok, shared), shared.answer
    assert _greedy_answers(model, tok, private), private.answer
