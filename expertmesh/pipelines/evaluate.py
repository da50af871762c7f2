"""Long-context retrieval evaluation over a mesh: passkey and multi-key needles.

For each length (and question offset, and registration mode), `samples` contexts with the
needle at depths spread evenly over 0-100% are registered with `mesh.register_context`; the
question is the prompt; greedy decoding; a sample is right when the number in the answer's
first tokens (as many as the expected answer has) equals the needle's.

Haystack (`source`): the standard synthetic filler (default), or real text
(text_sources: a held-out source the demo model was not trained on, or a local file).
Offsets (`offsets`): the context is sized so the question's first token falls at this offset
within an attention chunk (negative: from the chunk's end), e.g. 0 (the question starts a
chunk), chunk - len(question) (the answer starts a chunk), a few tokens less (the answer
crosses the boundary). `random_offsets`: each sample's question at a random offset (so lengths
are not multiples of the chunk; within half a chunk of the nominal length).
Stop: the model may generate 2 tokens past the answer; it "stops" when it ends the sequence
(eos, finish_reason "stop") within them.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import re
import time
from typing import Any

from expertmesh.pipelines import tasks, text_sources

SYNTHETIC = "synthetic"
STOP_SLACK = 2  # tokens allowed after the answer before the eos

_NUMBER = re.compile(r"\s*(\d+)")


def answered(text: str) -> str | None:
    m = _NUMBER.match(text)
    return m.group(1) if m else None


@dataclasses.dataclass
class Cell:
    task: str
    length: int
    mode: str
    source: str = SYNTHETIC  # how the haystack's text is cited (package=version)
    offset: int | None = None  # the question's first token within a chunk (None: as the length falls)
    answer_offset: int | None = None
    random_offsets: bool = False  # each sample's question at a random offset within a chunk
    samples: int = 0
    correct: int = 0
    stops: int = 0  # eos within STOP_SLACK tokens after the answer
    stops_correct: int = 0  # ... among the right answers
    tokens: int = 0  # context + question + answer, summed over samples
    register_s: float = 0.0
    answer_s: float = 0.0
    kv_bytes: int = 0  # KV of one registered context, all layers
    failures: list = dataclasses.field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.samples if self.samples else float("nan")

    @property
    def stop_rate(self) -> float:
        return self.stops / self.samples if self.samples else float("nan")

    def row(self) -> dict[str, Any]:
        return {"task": self.task, "length": self.length, "mode": self.mode, "source": self.source,
                "offset": "random" if self.random_offsets else self.offset, "answer_offset": self.answer_offset,
                "length_mean": round(self.tokens / max(1, self.samples)), "samples": self.samples,
                "correct": self.correct, "accuracy": round(self.accuracy, 4),
                "stops": self.stops, "stop_rate": round(self.stop_rate, 4), "stops_when_correct": self.stops_correct,
                "register_s_mean": round(self.register_s / max(1, self.samples), 2),
                "answer_s_mean": round(self.answer_s / max(1, self.samples), 3),
                "kv_gib": round(self.kv_bytes / 2 ** 30, 3), "failures": self.failures[:10]}


def context_length(length: int, question: int, offset: int | None, chunk: int, least: int = 0) -> int:
    """Tokens of context before a question (+ answer) of `question` tokens: `length - question`,
    or with `offset`, the nearest count >= `least` that puts the question's first token at
    `offset` (mod `chunk`) within an attention chunk."""
    base = length - question
    if offset is None:
        return base
    offset %= chunk
    c = base - base % chunk + offset
    candidates = [x for x in (c - chunk, c, c + chunk) if x >= least]
    return min(candidates, key=lambda x: (abs(x - base), x))


def make_task(task: str, length: int, index: int, samples: int, rng: random.Random, keys: int = 4,
              haystack: text_sources.Haystack | None = None, offset: int | None = None,
              chunk: int = 2048) -> tasks.Task:
    """The `index`-th of `samples` tasks whose context + question + answer is `length` tokens
    (the byte tokenizer: one token per byte), as RULER counts sequence length; in the standard
    filler, or in `haystack`'s text, with the question at `offset` within a chunk if given."""
    if task not in ("passkey", "multikey"):
        raise ValueError(f"unknown task {task!r}; choose passkey or multikey")
    if haystack is None and offset is None:
        return _filler_task(task, length, index, samples, rng, keys)
    return _text_task(task, length, index, samples, rng, keys, haystack or synthetic_haystack(), offset, chunk)


@functools.lru_cache(maxsize=1)
def synthetic_haystack() -> text_sources.Haystack:
    """The standard passkey filler as a haystack (for offset sweeps in the standard format)."""
    data = (tasks.PASSKEY_FILLER * (1 << 15)).encode()  # 2.9 MB: no repeats up to 1M-token contexts
    return text_sources.Haystack([text_sources.Text(SYNTHETIC, SYNTHETIC, SYNTHETIC, data)], mix_share=0.0)


def _text_task(task: str, length: int, index: int, samples: int, rng: random.Random, keys: int,
               haystack: text_sources.Haystack, offset: int | None, chunk: int) -> tasks.Task:
    depth = index / max(1, samples - 1)
    r = random.Random(rng.random())
    if task == "passkey":
        key = r.randint(1, 50000)
        intro, prompt, answer = tasks.PASSKEY_INTRO, tasks.PASSKEY_QUESTION, f" {key}."
        needles = [(depth, tasks.passkey_needle(key).encode())]
    else:
        words = r.sample(tasks.WORDS, keys)
        numbers = [r.randint(1000000, 9999999) for _ in words]
        pick = r.randrange(keys)
        intro, prompt, answer = "", tasks.multikey_prompt(words[pick]), f" {numbers[pick]}."
        needles = [(depth if j == pick else r.random(), tasks.multikey_line(w, n).encode())
                   for j, (w, n) in enumerate(zip(words, numbers))]
    fixed = len(intro.encode()) + sum(len(n) for _, n in needles)
    ctx = context_length(length, len(prompt) + len(answer), offset, chunk, least=fixed + 256)
    text = haystack.window(r, ctx - fixed, end_at_line=True)  # a document, then the question
    context = intro.encode() + tasks.insert_needles(text, needles)
    return tasks.Task(context.decode("utf-8"), prompt, answer)


def _filler_task(task: str, length: int, index: int, samples: int, rng: random.Random, keys: int) -> tasks.Task:
    """The standard format (docs/training.md, "The built-in model"): filler sentences, topped up after the context."""
    depth = index / max(1, samples - 1)
    seed, approx = rng.random(), length - 250
    while True:
        r = random.Random(seed)  # the same needles at every attempt
        t = (tasks.passkey(approx, r.randint(1, 50000), depth) if task == "passkey"
             else tasks.multikey(approx, keys, r, depth=depth))
        pad = length - len((t.context + t.prompt + t.answer).encode())
        if pad >= 0:
            break
        approx += pad - 50
    filler = tasks.PASSKEY_FILLER * (pad // len(tasks.PASSKEY_FILLER) + 1)  # top up after the context
    return tasks.Task(t.context + filler[len(filler) - pad:] if pad else t.context, t.prompt, t.answer)


def evaluate(mesh, task: str, lengths: list[int], modes: list[str], samples: int, seed: int = 0,
             keys: int = 4, log=print, haystack: text_sources.Haystack | None = None,
             offsets: list[int] | None = None, random_offsets: bool = False) -> list[Cell]:
    cells = []
    cfg = mesh.config
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    chunk = next((c for c in cfg.chunk_size if c), 2048)
    source = haystack.texts[0].cite if haystack is not None else SYNTHETIC
    for length in lengths:
        for offset in (offsets if offsets else [None]):
            for mode in modes:
                randomly = random_offsets and offset is None
                cell = Cell(task, length, mode, source=source, offset=None if offset is None else offset % chunk,
                            random_offsets=randomly)
                rng = random.Random(f"{seed}-{task}-{length}")  # same needles in every mode and offset
                where = random.Random(f"{seed}-{task}-{length}-offsets")
                for i in range(samples):
                    at = where.randrange(chunk) if randomly else offset
                    t = make_task(task, length, i, samples, rng, keys, haystack, at, chunk)
                    _ask(mesh, cell, t, mode, i, samples, kv_per_token, chunk)
                log(f"{task:8s} {length:>9,d} {mode:9s} "
                    f"{'' if offset is None else f'offset {cell.offset:4d} (answer at {cell.answer_offset:4d}) '}"
                    f"{'random offsets ' if randomly else ''}"
                    f"{cell.correct:>3d}/{cell.samples:<3d} acc {cell.accuracy:6.1%}  stops {cell.stop_rate:6.1%}  "
                    f"register {cell.register_s / cell.samples:6.1f} s  KV {cell.kv_bytes / 2 ** 30:.2f} GiB  "
                    f"[{source}]")
                cells.append(cell)
    return cells


def _ask(mesh, cell: Cell, t: tasks.Task, mode: str, i: int, samples: int, kv_per_token: int, chunk: int) -> None:
    """Register the task's context, ask its question (answer + STOP_SLACK tokens at most), score."""
    ids = mesh.tokenizer.encode(t.context)
    prompt = mesh.tokenizer.encode(t.prompt)
    n = len(mesh.tokenizer.encode(t.answer))
    t0 = time.perf_counter()
    ctx = mesh.register_context(ids, mode=mode)
    t1 = time.perf_counter()
    try:
        res = mesh.generate(prompt, context_id=ctx.id, max_new_tokens=n + STOP_SLACK)
    finally:
        mesh.drop_context(ctx.id)
    t2 = time.perf_counter()
    want = answered(t.answer)
    got = answered(mesh.tokenizer.decode(res.token_ids[:n]))
    stopped = res.finish_reason == "stop"
    cell.samples += 1
    cell.correct += int(got == want)
    cell.stops += int(stopped)
    cell.stops_correct += int(stopped and got == want)
    cell.tokens += len(ids) + len(prompt) + n
    if cell.offset is not None:
        cell.answer_offset = (len(ids) + len(prompt)) % chunk
    if got != want:
        cell.failures.append({"depth": round(i / max(1, samples - 1), 3), "want": want, "got": res.text})
    cell.register_s += t1 - t0
    cell.answer_s += t2 - t1
    cell.kv_bytes = len(ids) * kv_per_token
