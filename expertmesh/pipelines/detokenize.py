"""Incremental detokenisation with stop strings, for streaming."""

from __future__ import annotations

from typing import Callable


class TextStream:
    """Feed token ids; get the text that is safe to emit (no partial UTF-8, no partial stop string)."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str]) -> None:
        self.decode, self.stops = decode, stops
        self.ids: list[int] = []
        self.emitted = 0  # characters of the text already returned
        self.stopped = False
        self._hold = max((len(s) for s in stops), default=1) - 1

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        cut = min((i for i in (text.find(s, max(0, self.emitted - self._hold)) for s in self.stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.stopped = True
            return self._take(text[:cut])
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next bytes
            return ""
        return self._take(text[: max(self.emitted, len(text) - self._hold)])

    def flush(self) -> str:
        if self.stopped:
            return ""
        return self._take(self.decode(self.ids))

    def _take(self, upto: str) -> str:
        out = upto[self.emitted:]
        self.emitted = max(self.emitted, len(upto))
        return out
