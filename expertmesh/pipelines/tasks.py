"""Long-context tasks: passkey retrieval and multi-key needles (RULER style), in the
standard synthetic filler or in real text.

Used by the demo, the evaluation command and the training data generator. Real-text haystacks
are bytes (one byte = one token of the byte tokenizer); needles go in between sentences or
lines (`insert_needles`).
"""

from __future__ import annotations

import dataclasses
import random

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. "
                 "Find it and memorize them. I will quiz you about the important information there.")
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_QUESTION = " What is the pass key? The pass key is"


@dataclasses.dataclass(frozen=True)
class Task:
    context: str
    prompt: str
    answer: str


def passkey_needle(key: int) -> str:
    return f" The pass key is {key}. Remember it. {key} is the pass key."


def multikey_line(word: str, number: int) -> str:
    return f" The special magic number for {word} is: {number}."


def multikey_prompt(word: str) -> str:
    return (f" What is the special magic number for {word} mentioned in the provided text? "
            f"The special magic number for {word} mentioned in the provided text is")


def boundary(text: bytes, pos: int, reach: int = 400) -> int:
    """A cut point at or before `pos` right after a sentence end or a line end (or, failing that,
    a space) within `reach` bytes; else `pos` (moved back to the start of its UTF-8 character)."""
    lo = max(0, pos - reach)
    ends = [text.rfind(b". ", lo, pos), text.rfind(b"\n", lo, pos)]  # cut after the "." or the newline
    best = max(e + 1 for e in ends) if max(ends) >= 0 else -1
    if best > 0:
        return best
    space = text.rfind(b" ", lo, pos)
    if space >= 0:
        return space
    while 0 < pos < len(text) and 0x80 <= text[pos] < 0xC0:  # not inside a UTF-8 character
        pos -= 1
    return pos


def insert_needles(text: bytes, needles: list[tuple[float, bytes]]) -> bytes:
    """`text` with each needle inserted at (a sentence boundary near) its depth 0..1."""
    parts, last = [], 0
    for depth, needle in sorted(needles, key=lambda n: n[0]):
        cut = max(last, boundary(text, int(round(depth * len(text)))))
        parts += [text[last:cut], needle]
        last = cut
    parts.append(text[last:])
    return b"".join(parts)


def passkey(approx_chars: int, key: int, depth: float) -> Task:
    """The standard passkey format, needle at `depth` (0..1) of the filler."""
    reps = max(1, (approx_chars - len(PASSKEY_INTRO)) // len(PASSKEY_FILLER))
    before = int(round(reps * depth))
    needle = passkey_needle(key)
    context = PASSKEY_INTRO + PASSKEY_FILLER * before + needle + PASSKEY_FILLER * (reps - before)
    return Task(context, PASSKEY_QUESTION, f" {key}.")


WORDS = ("apple", "river", "falcon", "copper", "meadow", "violet", "harbor", "summit", "lantern", "orchid",
         "glacier", "pepper", "thunder", "willow", "marble", "saffron", "canyon", "ember", "juniper", "quartz")


def multikey(approx_chars: int, keys: int, rng: random.Random, depth: float | None = None) -> Task:
    """Several "special magic number" lines in filler; ask for one (its line at `depth` 0..1 if given)."""
    words = rng.sample(WORDS, keys)
    numbers = [rng.randint(1000000, 9999999) for _ in words]
    reps = max(keys, approx_chars // len(PASSKEY_FILLER))
    pick = rng.randrange(keys)
    slots = rng.sample(range(reps), keys)  # filler sentence after which each line goes
    if depth is not None:
        asked = min(reps - 1, int(round(depth * (reps - 1))))
        if asked in slots:
            slots[slots.index(asked)] = slots[pick]
        slots[pick] = asked
    line_at = {slot: j for j, slot in enumerate(slots)}
    parts = []
    for i in range(reps):
        parts.append(PASSKEY_FILLER)
        if i in line_at:
            j = line_at[i]
            parts.append(multikey_line(words[j], numbers[j]))
    return Task("".join(parts), multikey_prompt(words[pick]), f" {numbers[pick]}.")
