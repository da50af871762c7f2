"""The real-model user-path benchmark's inputs (bench_user_path.py --model smollm2): a harbour
keeper's logbook written from templates (seeded) after the demo's lighthouse text, in the
model's chat format, and short questions over it."""

from __future__ import annotations

import random
import re
from pathlib import Path

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
ADJ = ("Morning", "Evening", "Silver", "Grey", "Northern", "Southern", "Golden", "Quiet", "Bright", "Little",
       "Western", "Eastern", "Brave", "Patient", "Swift", "Old")
NOUN = ("Star", "Gull", "Heron", "Rose", "Anchor", "Harvest", "Promise", "Lantern", "Willow", "Falcon", "Tide",
        "Meadow", "Comet", "Pilgrim", "Sparrow", "Maiden")
KIND = ("schooner", "brig", "steamer", "ketch", "collier", "lugger", "barque", "trawler")
PORT = ("Whitby", "Hull", "Leith", "Bristol", "Cardiff", "Aberdeen", "Plymouth", "Dundee", "Grimsby", "Sunderland",
        "Falmouth", "Liverpool")
CARGO = ("coal", "timber", "salt", "barley", "slate", "wool", "herring", "lime", "iron rails", "potatoes",
         "bricks", "oats")
WEATHER = ("The morning was calm and grey, with a light wind from the west.",
           "A gale blew from the north-east all day and the sea broke over the pier.",
           "Thick fog lay on the water until noon, and the bell was rung every two minutes.",
           "The sky was clear and the glass stood high; the swell was long and slow.",
           "Rain fell without a pause from dawn to dusk, and the lamp was lit at four.",
           "Snow came in the night and the gallery rail was thick with ice by morning.")
EVENT = ("came in on the evening tide and tied up at the coal quay",
         "lost her foremast off the point and was towed in by the lifeboat",
         "ran aground on the sand bar and floated free at high water",
         "anchored in the roads to wait out the weather",
         "signalled for a pilot and was brought in before dark",
         "passed close under the cliffs without stopping")
EXTRA = ("The keeper burned {oil} gallons of oil that week and cleaned the lens twice.",
         "He repaired a cracked pane in the lantern room with glass brought from {port}.",
         "Two boys from the town came up to help paint the stair rail, and were paid in apples.",
         "The inspector from Trinity House visited on the {day} and found everything in good order.",
         "A cask of {cargo} washed up on the shingle and was handed to the receiver of wrecks.",
         "The keeper's wife baked bread for the crew of the lifeboat, who had been out all night.")
QUESTIONS = ("From which port did the {ship} sail?", "What cargo was the {ship} carrying?",
             "In which year did the {ship} come to the harbour?")


def _nth(day: int) -> str:
    return f"{day}{'th' if 10 <= day % 100 < 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(day % 10, 'th')}"


def logbook(seed: int = 0) -> list[tuple[str, str]]:
    """The logbook's entries, (paragraph, ship's name), each ship once (256), seeded."""
    rng = random.Random(seed)
    ships = [f"{a} {n}" for a in ADJ for n in NOUN]
    rng.shuffle(ships)
    out = []
    for i, ship in enumerate(ships):
        port, cargo = rng.choice(PORT), rng.choice(CARGO)
        out.append((f"On the {_nth(rng.randint(1, 28))} of {rng.choice(MONTHS)} {1874 + i % 58}. "
                    f"{rng.choice(WEATHER)} The keeper noted that the {rng.choice(KIND)} {ship}, out of {port} "
                    f"with a load of {cargo}, {rng.choice(EVENT)}. "
                    + rng.choice(EXTRA).format(oil=rng.randint(3, 12), port=rng.choice(PORT),
                                               day=_nth(rng.randint(4, 28)), cargo=rng.choice(CARGO)), ship))
    return out


def smollm2_inputs(context_tokens: int, prompts: int) -> tuple[Path, list[int], list[list[int]], dict]:
    """The upcycled SmolLM2 (made once into the cache), a context of at most `context_tokens`
    tokens (the system turn holding the document, cut at a word so that it fits) and `prompts`
    questions of one token length over it (the user's turn and the assistant's cue)."""
    from expertmesh.model.chat_template import ChatTemplate
    from expertmesh.model.tokenizer import HFTokenizer
    from expertmesh.pipelines.demo_real import DOCUMENT, SYSTEM, real_checkpoint

    ckpt = real_checkpoint()
    template, tok = ChatTemplate.from_checkpoint(ckpt), HFTokenizer(ckpt / "tokenizer.json")
    entries = logbook()
    document = (DOCUMENT.read_text().strip() + "\n\nThe keeper's log, as the museum transcribed it.\n\n"
                + "\n\n".join(text for text, _ in entries))

    def system(doc: str) -> list[dict]:
        return [{"role": "system", "content": SYSTEM + doc}]

    def head(doc: str) -> list[int]:
        return tok.encode(template.render(system(doc), add_generation_prompt=False))

    cuts = [m.start() for m in re.finditer(r"\s+", document)] + [len(document)]
    if len(head(document)) <= context_tokens:
        raise SystemExit(f"--context {context_tokens}: the document has only {len(head(document))} tokens")
    lo, hi = 0, len(cuts) - 1  # the longest prefix (cut at a word) whose context fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(head(document[:cuts[mid]])) <= context_tokens else (lo, mid - 1)
    doc = document[:cuts[lo]]
    context = head(doc)
    asked = [(q.format(ship=ship)) for text, ship in entries if text in doc for q in QUESTIONS]
    by_len: dict[int, list[tuple[str, list[int]]]] = {}
    whole_head = template.render(system(doc), add_generation_prompt=False)
    for question in asked:
        whole = template.render(system(doc) + [{"role": "user", "content": question}])
        assert whole.startswith(whole_head), "the template does not render the document's turn as a prefix"
        ids = tok.encode(whole[len(whole_head):])
        by_len.setdefault(len(ids), []).append((question, ids))
    length, picked = max(by_len.items(), key=lambda kv: (len(kv[1]), -kv[0]))
    if len(picked) < prompts:
        raise SystemExit(f"only {len(picked)} questions of one length ({length} tokens); {prompts} needed")
    random.Random(1).shuffle(picked)
    picked = picked[:prompts]
    info = {"model": "SmolLM2-135M-Instruct upcycled to 4 experts top-2 (fp32)", "checkpoint": str(ckpt),
            "context_text": (
                "English prose in the model's chat format: a system turn ('" + SYSTEM.strip() + "') holding a "
                "document: the demo's lighthouse text (expertmesh/assets/demo/lighthouse.txt, 2 paragraphs) then "
                f"a harbour keeper's logbook of {sum(text in doc for text, _ in entries)} entries written from "
                "templates in this script (seeded: each entry a date, one of 6 weather sentences, a ship of its "
                "own name with its port, cargo and one of 6 events, and one of 6 closing sentences; sentences "
                "repeat with variations), cut at a word to fit; tokenized with the model's tokenizer.json"),
            "prompts_text": (f"questions over the log, each the user's turn + the assistant's cue rendered by the "
                             f"chat template, all {length} tokens long (Hugging Face's batch has no padding), "
                             "e.g. " + ", ".join(repr(q) for q, _ in picked[:2])),
            "questions": [q for q, _ in picked]}
    return ckpt, context, [ids for _, ids in picked], info


# -- Hugging Face -------------------------------------------------------------------------------
