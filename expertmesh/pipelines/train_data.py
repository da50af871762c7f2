"""Synthetic long-context training data, written to Parquet for Ray Data.

Each row is one sequence: a context (filler with needles), a question, the answer.
Columns: `input_ids` (list<int32>, byte-tokenizer ids), `answer_start`, `answer_len`,
`task`. Rows are written in groups of equal length (one Parquet row group per group), so a
batch read from one group needs no padding.

Tasks (see tasks.py for the evaluation formats):
  passkey   the standard passkey format, key 1..50000, needle at any depth;
  multikey  several "special magic number" lines (RULER niah_multikey), ask for one.
Fillers: the standard passkey filler, or generated English-like prose.
"""

from __future__ import annotations

import dataclasses
import random
import string
from pathlib import Path

import numpy as np

from expertmesh.model.tokenizer import ByteTokenizer
from expertmesh.pipelines import tasks

_ADJ = ("small", "old", "quiet", "bright", "green", "heavy", "distant", "warm", "strange", "simple", "busy", "cold")
_NOUN = ("village", "teacher", "river", "market", "engine", "garden", "letter", "window", "forest", "road",
         "bridge", "sailor", "kitchen", "library", "farmer", "station", "island", "painter", "valley", "clock")
_VERB = ("watched", "crossed", "painted", "carried", "followed", "opened", "repaired", "visited", "found", "left")
_ADV = ("slowly", "again", "in the morning", "before noon", "without a word", "after the rain", "every day")


def prose(rng: random.Random, chars: int) -> str:
    """English-like filler of about `chars` characters."""
    out, n = [], 0
    while n < chars:
        s = (f" The {rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_VERB)} the "
             f"{rng.choice(_NOUN)} {rng.choice(_ADV)}.")
        out.append(s)
        n += len(s)
    return "".join(out)


def _filler(rng: random.Random, chars: int, prose_share: float) -> str:
    if rng.random() < prose_share:
        return prose(rng, chars)
    reps = max(1, chars // len(tasks.PASSKEY_FILLER))
    return tasks.PASSKEY_FILLER * reps


def _word(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(tasks.WORDS)
    return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 9)))


def _key(rng: random.Random) -> int:
    digits = rng.randint(1, 5)  # every key length equally often, then within 1..50000
    return rng.randint(10 ** (digits - 1), min(10 ** digits - 1, 50000))


def passkey_sample(rng: random.Random, chars: int, prose_share: float) -> tasks.Task:
    key = _key(rng)
    body = chars - len(tasks.PASSKEY_INTRO) - 60
    cut = int(rng.random() * body)
    fill = _filler(rng, body, prose_share)
    needle = f" The pass key is {key}. Remember it. {key} is the pass key."
    cut = fill.rfind(".", 0, cut) + 1  # needles sit between sentences
    context = tasks.PASSKEY_INTRO + fill[:cut] + needle + fill[cut:]
    return tasks.Task(context, tasks.PASSKEY_QUESTION, f" {key}.")


def multikey_sample(rng: random.Random, chars: int, prose_share: float) -> tasks.Task:
    keys = rng.randint(1, 4)
    words = []
    while len(words) < keys:
        w = _word(rng)
        if w not in words:
            words.append(w)
    numbers = [rng.randint(1000000, 9999999) for _ in words]
    fill = _filler(rng, chars - 60 * keys - 150, prose_share)
    cuts = sorted(fill.rfind(".", 0, int(rng.random() * len(fill))) + 1 for _ in words)
    parts, last = [], 0
    for c, w, n in zip(cuts, words, numbers):
        parts += [fill[last:c], f" The special magic number for {w} is: {n}."]
        last = c
    parts.append(fill[last:])
    pick = rng.randrange(keys)
    w = words[pick]
    prompt = (f" What is the special magic number for {w} mentioned in the provided text? "
              f"The special magic number for {w} mentioned in the provided text is")
    return tasks.Task("".join(parts), prompt, f" {numbers[pick]}.")


@dataclasses.dataclass
class DataSpec:
    """What `write_dataset` generates."""

    rows: int = 2048
    lengths: tuple[int, ...] = (1024, 2048, 4096)  # tokens per sequence (bytes)
    multikey_share: float = 0.4
    prose_share: float = 0.2
    group_rows: int = 16  # rows of one length written together (= a Parquet row group)
    seed: int = 0


def make_row(rng: random.Random, length: int, spec: DataSpec, tok: ByteTokenizer) -> dict:
    make = multikey_sample if rng.random() < spec.multikey_share else passkey_sample
    question_len = 200  # upper bound of prompt + answer
    if length < question_len + 400:
        raise ValueError(f"sequence length {length} is too short for a task (at least {question_len + 400})")
    task = make(rng, length - question_len - 150, spec.prose_share)
    pad = length - len((task.context + task.prompt + task.answer).encode())  # top up with filler after the context
    filler = tasks.PASSKEY_FILLER * (pad // len(tasks.PASSKEY_FILLER) + 1)
    text = task.context + filler[len(filler) - pad:] + task.prompt + task.answer
    ids = np.frombuffer(text.encode(), dtype=np.uint8).astype(np.int32) + tok.offset
    answer = len(task.answer.encode())
    return {"input_ids": ids, "answer_start": len(ids) - answer,
            "answer_len": answer, "task": make.__name__.split("_")[0]}


def write_dataset(out: str | Path, spec: DataSpec, files: int = 4) -> list[Path]:
    """Generate `spec.rows` rows into `files` Parquet files under `out`; returns the paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(spec.seed)
    tok = ByteTokenizer()
    groups = -(-spec.rows // spec.group_rows)
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("answer_start", pa.int32()),
                        ("answer_len", pa.int32()), ("task", pa.string())])
    paths = [out / f"part-{i:05d}.parquet" for i in range(files)]
    writers = [pq.ParquetWriter(p, schema, compression="zstd") for p in paths]
    try:
        for g in range(groups):
            length = rng.choice(spec.lengths)
            rows = [make_row(rng, length, spec, tok) for _ in range(min(spec.group_rows, spec.rows - g * spec.group_rows))]
            table = pa.table({
                "input_ids": pa.array([r["input_ids"] for r in rows], type=pa.list_(pa.int32())),
                "answer_start": pa.array([r["answer_start"] for r in rows], type=pa.int32()),
                "answer_len": pa.array([r["answer_len"] for r in rows], type=pa.int32()),
                "task": pa.array([r["task"] for r in rows]),
            }, schema=schema)
            writers[g % files].write_table(table, row_group_size=len(rows))
    finally:
        for w in writers:
            w.close()
    return paths
