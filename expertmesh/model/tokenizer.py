"""Tokenizers: byte-level (the default model; nothing to download) or a checkpoint's own."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    vocab_size: int
    available: bool  # False: no tokenizer (token ids only; encode/decode raise)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes shifted by `offset` (ids below it are special tokens: pad, bos, eos, ...)."""

    available = True

    def __init__(self, offset: int = 4, vocab_size: int | None = None) -> None:
        self.offset = offset
        self.vocab_size = vocab_size or 256 + offset
        if self.vocab_size < 256 + offset:
            raise ValueError(f"a byte tokenizer needs vocab_size >= {256 + offset}; the model has {self.vocab_size}")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]  # no special tokens to add

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - self.offset for i in ids if self.offset <= i < 256 + self.offset)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A checkpoint's `tokenizer.json`, through the `tokenizers` library."""

    available = True

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as _Tok

        self.path = str(path)  # tokenizer.json (the grammar engine reads it too)
        self._tok = _Tok.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """add_special_tokens: what the tokenizer's post-processor adds (a bos, for Llama's)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids))


class NoTokenizer:
    """A checkpoint with no tokenizer.json and too small a vocabulary for bytes: token ids only.

    `available` is False; `encode`/`decode` raise `NoTokenizer` errors naming the reason.
    """

    available = False

    def __init__(self, checkpoint_dir: Path, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.reason = (f"no tokenizer is available for checkpoint {str(checkpoint_dir)!r}: it has no "
                       f"tokenizer.json and its vocabulary of {vocab_size} is too small for the byte "
                       f"tokenizer (needs >= 260); use token ids")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        from expertmesh.errors import NoTokenizer as _Err

        raise _Err(self.reason)

    def decode(self, ids: list[int]) -> str:
        from expertmesh.errors import NoTokenizer as _Err

        raise _Err(self.reason)


def load_tokenizer(checkpoint_dir: Path, vocab_size: int) -> Tokenizer:
    """The checkpoint's tokenizer.json if present, else bytes (vocab_size >= 260), else none
    (`NoTokenizer`: the token-id API works, text calls raise)."""
    tok = Path(checkpoint_dir) / "tokenizer.json"
    if tok.is_file():
        return HFTokenizer(tok)
    if vocab_size < 256 + 4:
        return NoTokenizer(Path(checkpoint_dir), vocab_size)
    return ByteTokenizer(vocab_size=vocab_size)
