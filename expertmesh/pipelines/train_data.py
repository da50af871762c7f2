"""Long-context training data, written to Parquet for Ray Data.

Each row is one sequence: a context (a haystack with needles), a question, the answer, and
(with `eos`) the end-of-sequence token right after the answer, so a model trained on it stops
there. Columns: `input_ids` (list<int32>, byte-tokenizer ids), `answer_start`, `answer_len`
(the answer's tokens, the eos included), `task`. Rows are written in groups of equal length
(one Parquet row group per group), so a batch read from one group needs no padding.

Tasks (see tasks.py for the evaluation formats):
  passkey   the standard passkey format, key 1..50000, needle at any depth;
  multikey  several "special magic number" lines (RULER niah_multikey), ask for one.
Haystacks: real text (`text`: pinned Debian packages, see text_sources.py; a window of one
source, or of two or three sources one after another), or the synthetic fillers (the standard
passkey filler, or generated English-like prose) for `synthetic_share` of the rows.
Lengths: a fixed list, or random in a range (`length_range`, log-uniform, never a multiple of
the model's 2048-token attention chunk), so that across groups the question and the answer
fall at every offset within a chunk, at and across chunk boundaries; `boundary_share` of the
groups end just past a boundary, where the question or the answer starts at or straddles it.
"""

from __future__ import annotations

import dataclasses
import math
import random
import string
from pathlib import Path

import numpy as np

from expertmesh.model.default import DEFAULT_HF_CONFIG
from expertmesh.model.tokenizer import ByteTokenizer
from expertmesh.pipelines import tasks, text_sources

EOS_ID = DEFAULT_HF_CONFIG["eos_token_id"]  # 2: below the byte tokenizer's offset (4), never a byte
CHUNK = DEFAULT_HF_CONFIG["attention_chunk_size"]

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
    """What `write_dataset` generates. The defaults are the first demo model's data (synthetic
    fillers, fixed lengths, no eos); `text`, `length_range` and `eos` turn on the real-text data."""

    rows: int = 2048
    lengths: tuple[int, ...] = (1024, 2048, 4096)  # tokens per sequence (bytes), when no length_range
    multikey_share: float = 0.4
    prose_share: float = 0.2  # of the synthetic fillers: generated prose instead of the passkey filler
    group_rows: int = 16  # rows of one length written together (= a Parquet row group)
    seed: int = 0
    length_range: tuple[int, int] | None = None  # random lengths lo..hi (log-uniform), none a multiple of CHUNK
    text: tuple[str, ...] = ()  # real-text sources (text_sources names or paths); () = synthetic only
    text_cache: str = text_sources.DEFAULT_CACHE
    synthetic_share: float = 0.1  # with `text`: rows on the synthetic fillers instead
    mix_share: float = 0.3  # real-text haystacks made of 2-3 sources one after another
    intro_share: float = 0.8  # real-text passkey rows that open with the standard passkey intro
    max_keys: int = 4  # multikey rows have 1..max_keys lines
    eos: bool = False  # the eos token right after the answer (trained as an answer token)
    # with length_range: groups whose sequences end just past a chunk boundary (1..boundary_tail
    # tokens into a chunk), so the question or the answer starts at or straddles the boundary:
    # random lengths alone put it there in a few percent of the groups. The default tail covers a
    # multi-key question + answer + eos (~140 tokens); <= 10 puts the answer itself across it
    boundary_share: float = 0.0
    boundary_tail: int = 160

    def __post_init__(self) -> None:
        if self.length_range is not None:
            lo, hi = self.length_range
            if not MIN_LENGTH <= lo <= hi:
                raise ValueError(f"length range {lo}-{hi}: need {MIN_LENGTH} <= lo <= hi")
        for share in ("multikey_share", "prose_share", "synthetic_share", "mix_share", "intro_share",
                      "boundary_share"):
            if not 0 <= getattr(self, share) <= 1:
                raise ValueError(f"{share} must be within 0..1, got {getattr(self, share)}")
        if self.max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {self.max_keys}")
        if not 1 <= self.boundary_tail < CHUNK:
            raise ValueError(f"boundary_tail must be within 1..{CHUNK - 1} tokens, got {self.boundary_tail}")


MIN_LENGTH = 600  # a question + answer (<= 200 tokens) and some haystack


def pick_length(rng: random.Random, spec: DataSpec) -> int:
    """One group's sequence length: from `lengths`, or log-uniform in `length_range` avoiding
    multiples of the attention chunk (so sequences end at every offset within a chunk)."""
    if spec.length_range is None:
        return rng.choice(spec.lengths)
    lo, hi = spec.length_range
    boundary = spec.boundary_share and rng.random() < spec.boundary_share
    while True:
        n = int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1))))
        if boundary:  # the end of the sequence just past a chunk boundary
            n = (n // CHUNK) * CHUNK + rng.randint(1, spec.boundary_tail)
            if not lo <= n <= hi:
                continue
        n = min(hi, max(lo, n))
        if n % CHUNK or lo == hi:
            return n


def real_text_row(rng: random.Random, length: int, spec: DataSpec,
                  hay: text_sources.Haystack) -> tuple[bytes, str, str]:
    """(context + prompt, answer, task) of exactly `length` bytes in all, on a real-text haystack."""
    if rng.random() < spec.multikey_share:
        keys = rng.randint(1, spec.max_keys)
        words: list[str] = []
        while len(words) < keys:
            w = _word(rng)
            if w not in words:
                words.append(w)
        numbers = [rng.randint(1000000, 9999999) for _ in words]
        pick = rng.randrange(keys)
        needles = [tasks.multikey_line(w, n).encode() for w, n in zip(words, numbers)]
        intro, prompt, answer, task = "", tasks.multikey_prompt(words[pick]), f" {numbers[pick]}.", "multikey"
    else:
        key = _key(rng)
        needles = [tasks.passkey_needle(key).encode()]
        intro = tasks.PASSKEY_INTRO if rng.random() < spec.intro_share else ""
        prompt, answer, task = tasks.PASSKEY_QUESTION, f" {key}.", "passkey"
    body = length - len(intro) - sum(len(n) for n in needles) - len(prompt) - len(answer)
    context = tasks.insert_needles(hay.window(rng, body), [(rng.random(), n) for n in needles])
    return intro.encode() + context + prompt.encode(), answer, task


def synthetic_row(rng: random.Random, length: int, spec: DataSpec) -> tuple[bytes, str, str]:
    """(context + prompt, answer, task) of exactly `length` bytes, on the synthetic fillers."""
    make = multikey_sample if rng.random() < spec.multikey_share else passkey_sample
    question_len = 200  # upper bound of prompt + answer
    task = make(rng, length - question_len - 150, spec.prose_share)
    pad = length - len((task.context + task.prompt + task.answer).encode())  # top up with filler after the context
    filler = tasks.PASSKEY_FILLER * (pad // len(tasks.PASSKEY_FILLER) + 1)
    return (task.context + filler[len(filler) - pad:] + task.prompt).encode(), task.answer, make.__name__.split("_")[0]


def make_row(rng: random.Random, length: int, spec: DataSpec, tok: ByteTokenizer,
             hay: text_sources.Haystack | None = None) -> dict:
    """One sequence of exactly `length` tokens: context, question, answer (+ eos)."""
    if length < MIN_LENGTH:
        raise ValueError(f"sequence length {length} is too short for a task (at least {MIN_LENGTH})")
    eos = int(spec.eos)
    if hay is not None and rng.random() >= spec.synthetic_share:
        text, answer, task = real_text_row(rng, length - eos, spec, hay)
    else:
        text, answer, task = synthetic_row(rng, length - eos, spec)
    ids = np.frombuffer(text + answer.encode(), dtype=np.uint8).astype(np.int32) + tok.offset
    if eos:
        ids = np.append(ids, np.int32(EOS_ID))
    answer_len = len(answer.encode()) + eos
    return {"input_ids": ids, "answer_start": len(ids) - answer_len, "answer_len": answer_len, "task": task}


def _table(rows: list[dict]):
    import pyarrow as pa

    return pa.table({
        "input_ids": pa.array([r["input_ids"] for r in rows], type=pa.list_(pa.int32())),
        "answer_start": pa.array([r["answer_start"] for r in rows], type=pa.int32()),
        "answer_len": pa.array([r["answer_len"] for r in rows], type=pa.int32()),
        "task": pa.array([r["task"] for r in rows]),
    }, schema=_schema())


def _schema():
    import pyarrow as pa

    return pa.schema([("input_ids", pa.list_(pa.int32())), ("answer_start", pa.int32()),
                      ("answer_len", pa.int32()), ("task", pa.string())])


def _group_sizes(spec: DataSpec) -> list[int]:
    groups = -(-spec.rows // spec.group_rows)
    return [min(spec.group_rows, spec.rows - g * spec.group_rows) for g in range(groups)]


def _write_file(path: Path, spec: DataSpec, index: int, files: int) -> int:
    """Real-text data: file `index` gets groups index, index + files, ... from its own random
    stream, so the data set is the same whatever the number of worker processes."""
    import pyarrow.parquet as pq

    rng = random.Random(f"{spec.seed}-file-{index}")
    tok = ByteTokenizer()
    hay = text_sources.Haystack.load(spec.text, spec.text_cache, spec.mix_share)
    rows_written = 0
    with pq.ParquetWriter(path, _schema(), compression="zstd") as writer:
        for size in _group_sizes(spec)[index::files]:
            length = pick_length(rng, spec)
            writer.write_table(_table([make_row(rng, length, spec, tok, hay) for _ in range(size)]),
                               row_group_size=size)
            rows_written += size
    return rows_written


def write_dataset(out: str | Path, spec: DataSpec, files: int = 4, workers: int = 1) -> list[Path]:
    """Generate `spec.rows` rows into `files` Parquet files under `out`; returns the paths.
    With real text (`spec.text`), `workers` processes write the files in parallel."""
    import pyarrow.parquet as pq

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"part-{i:05d}.parquet" for i in range(files)]
    if spec.text:
        for name in text_sources.resolve(list(spec.text)):  # fetch once, before the workers read
            text_sources.load(name, spec.text_cache)
        if workers > 1:
            import concurrent.futures as cf
            import multiprocessing

            with cf.ProcessPoolExecutor(min(workers, files), mp_context=multiprocessing.get_context("spawn")) as pool:
                list(pool.map(_write_file, paths, [spec] * files, range(files), [files] * files))
        else:
            for i, p in enumerate(paths):
                _write_file(p, spec, i, files)
        return paths
    rng = random.Random(spec.seed)  # the synthetic data: one random stream, as the first demo model had
    tok = ByteTokenizer()
    writers = [pq.ParquetWriter(p, _schema(), compression="zstd") for p in paths]
    try:
        for g, size in enumerate(_group_sizes(spec)):
            length = pick_length(rng, spec)
            rows = [make_row(rng, length, spec, tok) for _ in range(size)]
            writers[g % files].write_table(_table(rows), row_group_size=len(rows))
    finally:
        for w in writers:
            w.close()
    return paths
