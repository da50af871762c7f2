"""lm-eval (EleutherAI's harness) as a real client of `expertmesh serve`: its `local-completions`
model (loglikelihood: `echo` + `logprobs` through /v1/completions; generate_until with token-id
prompts and five stop strings) and its `local-chat-completions` model (generate_until through
/v1/chat/completions and the checkpoint's chat template) give the metric values of lm-eval's own
`hf` model on the same checkpoint, and the same answer to every request (log-likelihoods within
1e-4, the generated text equal).

The checkpoint: the built-in model, served by the session's e2e server (3 shards, 2 expert groups);
lm-eval reads its tokens with a Hugging Face tokenizer equal to its byte tokenizer. The tasks:
tests/e2e/lm_eval_task (questions written for this project). A real BPE model, the upcycled
SmolLM2, is benchmarks/bench_lm_eval.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from expertmesh.model.default import SHIPPED
from expertmesh.model.tokenizer import ByteTokenizer
from tests.e2e.conftest import KEYS

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'expertmesh[eval]')")

pytestmark = [pytest.mark.ray, pytest.mark.e2e]
TASKS = Path(__file__).parent / "lm_eval_task"
MC, QA = "expertmesh_mc", "expertmesh_qa"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what the `tokenizers` ByteLevel steps use)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def byte_tokenizer_dir(path: Path) -> Path:
    """A Hugging Face fast tokenizer that encodes as the built-in model's ByteTokenizer (byte b ->
    id b + 4; 0-3 special, bos 1, eos 2, no bos added), with the checkpoint's chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {c: b + 4 for b, c in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.chat_template = (SHIPPED / "chat_template.jinja").read_text()
    fast.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    path = byte_tokenizer_dir(tmp_path_factory.mktemp("byte-tokenizer"))
    hf, ours = AutoTokenizer.from_pretrained(path), ByteTokenizer(vocab_size=260)
    texts = [json.dumps(json.loads(line)) for name in ("mc.jsonl", "qa.jsonl")
             for line in (TASKS / name).read_text().splitlines()] + ["Question: \u00e9t\u00e9?\nAnswer: caf\u00e9"]
    for text in texts:
        assert hf.encode(text) == ours.encode(text), text  # no bos added, as the server's completions
        assert hf.decode(hf.encode(text)) == ours.decode(ours.encode(text)) == text
    return str(path)


def run(model: str, model_args: dict, task: str, limit: int, **kw) -> dict:
    """lm-eval's simple_evaluate (what its CLI runs) on one of the local tasks, every sample logged."""
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(TASKS), include_defaults=False)  # not its 12k built-in tasks
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], limit=limit,
                                   task_manager=tasks, log_samples=True, bootstrap_iters=0, **kw)


def metrics(out: dict, task: str) -> dict:
    """{"acc,none": value, ...}: each metric's value under each filter (no standard errors)."""
    return {k: v for k, v in out["results"][task].items() if "," in k and "_stderr," not in k}


def responses(out: dict, task: str) -> list:
    """Per document, in order, the model's answers: [[(log-likelihood, is greedy)] per choice] or [[text]]
    (a document is logged once per filter, with the same answers)."""
    return [r for _, r in sorted({s["doc_id"]: s["resps"] for s in out["samples"][task]}.items())]


def assert_same_loglikelihoods(want: dict, got: dict) -> None:
    assert metrics(got, MC) == metrics(want, MC) and set(metrics(want, MC)) == {"acc,none", "acc_norm,none"}
    for w_doc, g_doc in zip(responses(want, MC), responses(got, MC), strict=True):
        assert len(w_doc) == len(g_doc) == 4  # one request per choice
        for [(w_ll, w_greedy)], [(g_ll, g_greedy)] in zip(w_doc, g_doc):
            assert abs(g_ll - w_ll) <= 1e-4 and g_greedy == w_greedy, (w_doc, g_doc)


def assert_same_generations(want: dict, got: dict) -> None:
    assert metrics(got, QA) == metrics(want, QA)
    assert set(metrics(want, QA)) == {"exact_match,strip", "exact_match,last_word"}
    assert responses(got, QA) == responses(want, QA)  # the generated text, request by request


def test_lm_eval_against_the_server_equals_hf(server, tokenizer, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEYS["acme"])  # what lm-eval's API models send as the Bearer key
    hf = {"pretrained": str(SHIPPED), "tokenizer": tokenizer, "device": "cpu", "dtype": "float32"}
    completions = {"base_url": f"{server}/v1/completions", "model": "expertmesh", "tokenizer": tokenizer,
                   "tokenizer_backend": "huggingface"}  # token-id requests, lm-eval's own tokenization
    chat = {"base_url": f"{server}/v1/chat/completions", "model": "expertmesh", "num_concurrent": 4}

    assert_same_loglikelihoods(run("hf", hf, MC, limit=24, batch_size=8),
                               run("local-completions", {**completions, "batch_size": 8}, MC, limit=24))
    assert_same_generations(run("hf", hf, QA, limit=10, batch_size=1, apply_chat_template=True),
                            run("local-chat-completions", chat, QA, limit=10, apply_chat_template=True))
    # stop: the task's four `until` strings and the eos text (OpenAI's limit of 4 refused it)
    assert_same_generations(run("hf", hf, QA, limit=10, batch_size=1),
                            run("local-completions", {**completions, "num_concurrent": 4}, QA, limit=10))
