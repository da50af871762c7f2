"""Structured output: a grammar (a JSON schema, any JSON object, a regex) as a token mask per
step, with llguidance (the Rust engine vLLM and SGLang also use; a wheel with no dependencies).

A `GrammarSpec` travels whole in `SamplingParams`; the router builds one `Matcher` per sequence
from it (`Grammars` compiles against the checkpoint's tokenizer once and caches compiled
grammars by spec). Before a token is drawn the matcher's mask sets the logits of every token the
grammar does not allow next to -inf (after log-probabilities are taken: those stay the model's
own); the token drawn is then consumed. A grammar that cannot be compiled is refused where the
request is built (`check`), with the engine's message.
"""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from typing import Any

import numpy as np
import torch

KINDS = ("json_schema", "json_object", "regex")
ANY_JSON_OBJECT = {"type": "object"}


@dataclasses.dataclass(frozen=True)
class GrammarSpec:
    """kind: json_schema (source: the schema as JSON text), json_object (any JSON object), regex."""

    kind: str
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"grammar kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.source, str):
            raise ValueError(f"grammar source must be a string, got {type(self.source).__name__}")
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.source)
            except ValueError as exc:
                raise ValueError(f"json_schema: not JSON ({exc})") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError(f"json_schema: a schema is a JSON object, got {type(schema).__name__}")

    def grammar(self) -> str:
        """The llguidance grammar text."""
        from llguidance import LLMatcher

        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.source)
        schema = ANY_JSON_OBJECT if self.kind == "json_object" else json.loads(self.source)
        # compact JSON, no whitespace between items: the model cannot pad an answer out forever
        return LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})


class _ByteVocab:
    """A byte tokenizer (model/tokenizer.py ByteTokenizer) as llguidance's TokenizerWrapper."""

    def __init__(self, offset: int, vocab_size: int, eos: int, bos: int | None) -> None:
        self.eos_token_id, self.bos_token_id = eos, bos
        self.tokens = [b"<special_%d>" % i if i < offset or i >= offset + 256 else bytes([i - offset])
                       for i in range(vocab_size)]
        self.special_token_ids = [i for i in range(vocab_size) if i < offset or i >= offset + 256]
        self.offset = offset

    def __call__(self, s: bytes | str) -> list[int]:
        data = s.encode("utf-8") if isinstance(s, str) else s
        return [b + self.offset for b in data]


def _lltokenizer(tokenizer: Any, vocab_size: int, eos_ids: tuple[int, ...], bos: int | None):
    import llguidance

    from expertmesh.model.tokenizer import ByteTokenizer, HFTokenizer

    eos = list(eos_ids) or [0]
    if isinstance(tokenizer, ByteTokenizer):
        wrapper = llguidance.TokenizerWrapper(_ByteVocab(tokenizer.offset, vocab_size, eos[0], bos))
        return llguidance.LLTokenizer(wrapper, n_vocab=vocab_size, eos_token=eos)
    if isinstance(tokenizer, HFTokenizer):
        return llguidance.LLTokenizer(tokenizer.path, n_vocab=vocab_size, eos_token=eos)
    raise ValueError("structured output needs a tokenizer (this checkpoint has none): use token ids and no grammar")


class Grammars:
    """Compiled grammars for one checkpoint's tokenizer (built on first use, cached by spec)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: tuple[int, ...], bos: int | None = None) -> None:
        self._args = (tokenizer, vocab_size, tuple(eos_ids), bos)
        self.vocab_size = vocab_size
        self._tok = None
        self._compiled = lru_cache(maxsize=256)(self._compile)

    @property
    def lltokenizer(self):
        if self._tok is None:
            self._tok = _lltokenizer(*self._args)
        return self._tok

    def _compile(self, spec: GrammarSpec) -> str:
        from llguidance import LLMatcher

        grammar = spec.grammar()
        error = LLMatcher.validate_grammar(grammar, self.lltokenizer)
        if error and not error.startswith("WARNING"):
            raise ValueError(f"{spec.kind}: the grammar engine cannot compile it: {error}")
        return grammar

    def check(self, spec: GrammarSpec) -> None:
        """Raise ValueError (what is wrong) if `spec` cannot be compiled."""
        try:
            self._compiled(spec)
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 - the engine's own error on a bad schema: the caller's 400
            raise ValueError(f"{spec.kind}: the grammar engine cannot compile it: {exc}") from None

    def matcher(self, spec: GrammarSpec) -> "Matcher":
        from llguidance import LLMatcher

        self.check(spec)
        return Matcher(LLMatcher(self.lltokenizer, self._compiled(spec), log_level=0), self.vocab_size)


class Matcher:
    """One sequence's place in its grammar."""

    def __init__(self, matcher, vocab_size: int) -> None:
        self.m, self.vocab_size = matcher, vocab_size

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] with every token the grammar does not allow next at -inf (a new tensor)."""
        bits = np.frombuffer(self.m.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: logits.shape[-1]].astype(bool)
        out = logits.float().clone()
        out[torch.from_numpy(~allowed)] = -float("inf")
        return out

    def consume(self, token: int) -> None:
        if not self.m.consume_token(token):
            raise ValueError(f"token {token} does not fit the grammar: {self.m.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but eos may follow."""
        return self.m.is_stopped()
