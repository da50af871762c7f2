"""Structured output's masks (llguidance): every draw fits the grammar, for the byte tokenizer and
a real BPE tokenizer; a grammar that cannot compile says why; the mask costs well under a step."""

import json
import time

import jsonschema
import pytest
import torch

from expertmesh.model.grammar import Grammars, GrammarSpec
from expertmesh.model.tokenizer import ByteTokenizer

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "n": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["city", "n"], "additionalProperties": False}


def draw(grammars, spec, vocab, seed, steps=200):
    matcher = grammars.matcher(spec)
    gen = torch.Generator().manual_seed(seed)
    out, t0 = [], time.perf_counter()
    for _ in range(steps):
        logits = matcher.mask(torch.randn(vocab, generator=gen) * 3)
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        matcher.consume(token)
        out.append(token)
        if matcher.done:
            break
    return out, (time.perf_counter() - t0) / len(out)


def test_random_draws_under_a_schema_always_fit_it():
    g = Grammars(ByteTokenizer(), 260, (2,), 1)
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    for seed in range(5):  # random logits: only the mask keeps the answer in the schema
        out, per_token = draw(g, spec, 260, seed)
        value = json.loads(ByteTokenizer().decode([t for t in out if t != 2]))
        jsonschema.validate(value, SCHEMA)
        assert per_token < 2e-3  # measured ~35 us a token here
    out, _ = draw(g, GrammarSpec("regex", r"[0-9]{3}-[a-z]{2}"), 260, 9)
    text = ByteTokenizer().decode([t for t in out if t != 2])
    assert len(text) == 6 and text[3] == "-" and text[:3].isdigit()


def test_a_bpe_tokenizer_and_a_bad_schema(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from expertmesh.model.tokenizer import HFTokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()  # as a real tokenizer.json has it
    text = ['{"city": "Paris", "n": 3}', "the capital of France is Paris"] * 50
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = HFTokenizer(tmp_path / "tokenizer.json")
    g = Grammars(hf, hf.vocab_size, (1,))
    out, _ = draw(g, GrammarSpec("json_object"), hf.vocab_size, 3, steps=400)
    assert isinstance(json.loads(hf.decode([t for t in out if t != 1])), dict)
    with pytest.raises(ValueError, match="json_schema"):
        g.check(GrammarSpec("json_schema", json.dumps({"type": "nonsense"})))
    with pytest.raises(ValueError, match="not JSON"):
        GrammarSpec("json_schema", "{not json")
