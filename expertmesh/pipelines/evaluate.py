"""Long-context retrieval evaluation over a mesh: passkey and multi-key needles.

For each length (and registration mode), `samples` contexts with the needle at depths spread
evenly over 0-100% are registered with `mesh.register_context`; the question is the prompt;
greedy decoding; a sample is right when the number the model answers equals the needle's.
"""

from __future__ import annotations

import dataclasses
import random
import re
import time
from typing import Any

from expertmesh.pipelines import tasks

_NUMBER = re.compile(r"\s*(\d+)")


def answered(text: str) -> str | None:
    m = _NUMBER.match(text)
    return m.group(1) if m else None


@dataclasses.dataclass
class Cell:
    task: str
    length: int
    mode: str
    samples: int = 0
    correct: int = 0
    register_s: float = 0.0
    answer_s: float = 0.0
    kv_bytes: int = 0  # KV of one registered context, all layers
    failures: list = dataclasses.field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.samples if self.samples else float("nan")

    def row(self) -> dict[str, Any]:
        return {"task": self.task, "length": self.length, "mode": self.mode, "samples": self.samples,
                "correct": self.correct, "accuracy": round(self.accuracy, 4),
                "register_s_mean": round(self.register_s / max(1, self.samples), 2),
                "answer_s_mean": round(self.answer_s / max(1, self.samples), 3),
                "kv_gib": round(self.kv_bytes / 2 ** 30, 3), "failures": self.failures[:10]}


def make_task(task: str, length: int, index: int, samples: int, rng: random.Random, keys: int = 4) -> tasks.Task:
    """The `index`-th of `samples` tasks whose context + question + answer is `length` tokens
    (the byte tokenizer: one token per byte), as RULER counts sequence length."""
    depth = index / max(1, samples - 1)
    if task not in ("passkey", "multikey"):
        raise ValueError(f"unknown task {task!r}; choose passkey or multikey")
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
             keys: int = 4, log=print) -> list[Cell]:
    cells = []
    cfg = mesh.config
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    for length in lengths:
        for mode in modes:
            cell = Cell(task, length, mode)
            rng = random.Random(f"{seed}-{task}-{length}")  # same needles in every mode
            for i in range(samples):
                t = make_task(task, length, i, samples, rng, keys)
                ids = mesh.tokenizer.encode(t.context)
                t0 = time.perf_counter()
                ctx = mesh.register_context(ids, mode=mode)
                t1 = time.perf_counter()
                try:
                    res = mesh.generate(mesh.tokenizer.encode(t.prompt), context_id=ctx.id,
                                        max_new_tokens=len(mesh.tokenizer.encode(t.answer)))
                finally:
                    mesh.drop_context(ctx.id)
                t2 = time.perf_counter()
                want = answered(t.answer)
                got = answered(res.text)
                cell.samples += 1
                cell.correct += int(got == want)
                if got != want:
                    cell.failures.append({"depth": round(i / max(1, samples - 1), 3), "want": want, "got": res.text})
                cell.register_s += t1 - t0
                cell.answer_s += t2 - t1
                cell.kv_bytes = len(ids) * kv_per_token
            log(f"{task:8s} {length:>9,d} {mode:9s} {cell.correct:>3d}/{cell.samples:<3d} "
                f"acc {cell.accuracy:6.1%}  register {cell.register_s / cell.samples:6.1f} s  "
                f"KV {cell.kv_bytes / 2 ** 30:.2f} GiB")
            cells.append(cell)
    return cells
