"""lm-eval (EleutherAI's harness) as a real client of `expertmesh serve`: its `local-completions`
model (loglikelihood requests: `echo` + `logprobs` through /v1/completions) and its
`local-chat-completions` model (generate_until through /v1/chat/completions and the checkpoint's
chat template) give the metric values of lm-eval's own `hf` model on the same checkpoint, and the
same answer to every request (log-likelihoods within 1e-4, generated text equal).

The checkpoint: a tiny random Mixtral (4 experts, top-2) with a real byte-level BPE tokenizer that
adds a bos, as Llama's does, and a chat template that writes it. The tasks:
tests/e2e/lm_eval_task (questions written for this project). The real model (the upcycled
SmolLM2) is benchmarks/bench_lm_eval.py.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch

from tests.e2e.serving import serve_process

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'expertmesh[eval]')")

pytestmark = [pytest.mark.e2e]
TASKS = Path(__file__).parent / "lm_eval_task"
CHAT = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
MC, QA = "expertmesh_mc", "expertmesh_qa"


def build_checkpoint(path: Path) -> Path:
    """A byte-level BPE trained on the tasks' text (every printable ASCII character in its
    alphabet, so any token decodes to ASCII), its post-processor adding <s>; a random Mixtral over
    exactly its vocabulary, logits sharpened so greedy choices are clear."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    corpus = [string.printable, CHAT]
    for name in ("mc.jsonl", "qa.jsonl"):
        for line in (TASKS / name).read_text().splitlines():
            doc = json.loads(line)
            corpus += [doc["question"], *doc.get("choices", []), str(doc["answer"])]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT
    fast.save_pretrained(str(path))
    cfg = tf.MixtralConfig(vocab_size=len(fast), hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=48, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(1234)
    model = tf.MixtralForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(str(path))
    return path


def run(model: str, model_args: dict, task: str, limit: int, **kw) -> dict:
    """lm-eval's simple_evaluate (what its CLI runs) on one of the local tasks, every sample logged."""
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], limit=limit,
                                   task_manager=TaskManager(include_path=str(TASKS)), log_samples=True,
                                   bootstrap_iters=0, **kw)


def metrics(out: dict, task: str) -> dict:
    return {k: v for k, v in out["results"][task].items() if not k.endswith("_stderr,none") and k != "alias"}


def responses(out: dict, task: str) -> list:
    """Per document (in doc order), the model's answers: (log-likelihood, is greedy) per choice, or the text."""
    return [s["resps"] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp("lm-eval-model"))
    from transformers import AutoTokenizer

    from expertmesh.model.tokenizer import HFTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ours = HFTokenizer(path / "tokenizer.json")
    text = "Question: What do bees make?\nAnswer: honey"
    assert tok.encode(text) == ours.encode(text, add_special_tokens=True) and tok.encode(text)[0] == 1  # a bos
    return path


def assert_same_loglikelihoods(want: dict, got: dict) -> None:
    assert metrics(got, MC) == metrics(want, MC) and set(metrics(want, MC)) == {"acc,none", "acc_norm,none"}
    for w_doc, g_doc in zip(responses(want, MC), responses(got, MC), strict=True):
        assert len(w_doc) == len(g_doc) == 4  # one request per choice: [(log-likelihood, is greedy)]
        for [(w_ll, w_greedy)], [(g_ll, g_greedy)] in zip(w_doc, g_doc):
            assert abs(g_ll - w_ll) <= 1e-4 and g_greedy == w_greedy, (w_doc, g_doc)


def assert_same_generations(want: dict, got: dict) -> None:
    assert metrics(got, QA) == metrics(want, QA)
    assert responses(got, QA) == responses(want, QA)  # the generated text, request by request
    assert sum(bool(text) for [text] in responses(want, QA)) >= len(responses(want, QA)) // 2  # mostly not empty


def test_lm_eval_against_the_server_equals_hf(checkpoint, tmp_path):
    ckpt = str(checkpoint)
    hf = {"pretrained": ckpt, "device": "cpu", "dtype": "float32"}
    want_mc = run("hf", hf, MC, limit=24, batch_size=8)
    want_chat = run("hf", hf, QA, limit=10, batch_size=1, apply_chat_template=True)
    want_plain = run("hf", hf, QA, limit=10, batch_size=1)
    with serve_process(checkpoint, tmp_path, "--context-shards", "1", "--expert-groups", "2") as url:
        # token ids from lm-eval's own tokenizer of the checkpoint; add_bos_token: this tokenizer
        # adds a bos, which lm-eval's hf model keeps and its API models drop unless told
        completions = {"base_url": f"{url}/v1/completions", "model": "expertmesh", "tokenizer": ckpt,
                       "tokenizer_backend": "huggingface", "add_bos_token": True}
        got_mc = run("local-completions", {**completions, "batch_size": 8}, MC, limit=24)
        chat = {"base_url": f"{url}/v1/chat/completions", "model": "expertmesh", "num_concurrent": 4}
        got_chat = run("local-chat-completions", chat, QA, limit=10, apply_chat_template=True)
        got_plain = run("local-completions", {**completions, "num_concurrent": 4}, QA, limit=10)  # 5 stop strings
        no_bos = run("local-completions", {**completions, "add_bos_token": False}, MC, limit=2)
    assert_same_loglikelihoods(want_mc, got_mc)
    assert_same_generations(want_chat, got_chat)
    assert_same_generations(want_plain, got_plain)
    # the flag matters: without it the server is asked about other tokens than hf is
    lls = lambda out: [ll for doc in responses(out, MC)[:2] for [(ll, _)] in doc]  # noqa: E731
    assert all(abs(a - b) > 1e-3 for a, b in zip(lls(no_bos), lls(want_mc), strict=True))
