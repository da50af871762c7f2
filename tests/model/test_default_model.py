import torch

from expertmesh.model import load_model
from expertmesh.model.default import default_checkpoint
from expertmesh.model.tokenizer import ByteTokenizer


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
    monkeypatch.setenv("EXPERTMESH_CACHE", str(tmp_path / "again"))
    again = load_model(default_checkpoint())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_byte_tokenizer_round_trips_utf8():
    tok = ByteTokenizer()
    text = "Grüße, 世界! The pass key is 12345."
    assert tok.decode(tok.encode(text)) == text
    assert min(tok.encode(text)) >= 4 and max(tok.encode(text)) < 260
