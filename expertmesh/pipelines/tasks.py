"""Synthetic long-context tasks: passkey retrieval and multi-key needles (RULER style).

Used by the demo, the evaluation command and the training data generator.
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


def passkey(approx_chars: int, key: int, depth: float) -> Task:
    """The standard passkey format, needle at `depth` (0..1) of the filler."""
    reps = max(1, (approx_chars - len(PASSKEY_INTRO)) // len(PASSKEY_FILLER))
    before = int(round(reps * depth))
    needle = f" The pass key is {key}. Remember it. {key} is the pass key."
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
            parts.append(f" The special magic number for {words[j]} is: {numbers[j]}.")
    w = words[pick]
    prompt = (f" What is the special magic number for {w} mentioned in the provided text? "
              f"The special magic number for {w} mentioned in the provided text is")
    return Task("".join(parts), prompt, f" {numbers[pick]}.")
