"""The synthetic training data and the evaluation tasks."""

from __future__ import annotations

import random

import numpy as np
import pyarrow.parquet as pq
import pytest

from expertmesh.model.tokenizer import ByteTokenizer
from expertmesh.pipelines import tasks
from expertmesh.pipelines.evaluate import answered, make_task
from expertmesh.pipelines.train_data import DataSpec, make_row, write_dataset
from expertmesh.pipelines.train_step import collate


def test_rows_have_exact_length_and_the_answer_at_the_end():
    tok, rng = ByteTokenizer(), random.Random(0)
    for length in (1024, 2048):
        for _ in range(30):
            row = make_row(rng, length, DataSpec(), tok)
            ids = row["input_ids"]
            assert len(ids) == length
            text = tok.decode(ids.tolist())
            answer = tok.decode(ids[row["answer_start"]:].tolist())
            assert answer.startswith(" ") and answer.endswith(".")
            number = answer.strip(" .")
            assert number.isdigit(), answer  # a number, never empty
            assert f" {number}." in text[:row["answer_start"]]  # the needle line ends with it
            assert text[:row["answer_start"]].endswith(" is")


def test_too_short_length_is_refused():
    with pytest.raises(ValueError, match="too short"):
        make_row(random.Random(0), 300, DataSpec(), ByteTokenizer())


def test_parquet_dataset_groups_rows_of_one_length(tmp_path):
    paths = write_dataset(tmp_path, DataSpec(rows=40, lengths=(768, 1024), group_rows=8), files=2)
    for p in paths:
        f = pq.ParquetFile(p)
        for g in range(f.num_row_groups):
            lengths = {len(x) for x in f.read_row_group(g).column("input_ids").to_pylist()}
            assert len(lengths) == 1
    table = pq.read_table(tmp_path)
    assert table.num_rows == 40


def test_collate_marks_answer_targets():
    ids = np.arange(10, 20)
    batch = collate({"input_ids": [ids, ids[:8]], "answer_start": [7, 5], "answer_len": [3, 3]})
    assert batch["ids"].shape == (2, 10)
    # position 6 predicts token 7 (the first answer token)
    assert batch["answer"][0].nonzero().flatten().tolist() == [6, 7, 8]
    assert batch["targets"][0, 6].item() == 17
    assert batch["valid"][1].sum().item() == 7  # 8 real tokens, 7 next-token targets
    assert batch["mask"][1].sum().item() == 8


@pytest.mark.parametrize("task", ["passkey", "multikey"])
def test_eval_tasks_have_the_requested_total_length(task):
    rng = random.Random(1)
    for i, length in enumerate((4096, 8192, 5000)):
        t = make_task(task, length, i, 3, rng)
        assert len((t.context + t.prompt + t.answer).encode()) == length
        assert answered(t.answer) in t.context


def test_passkey_standard_format():
    t = tasks.passkey(3000, 4242, 0.5)
    assert t.context.startswith(tasks.PASSKEY_INTRO)
    assert " The pass key is 4242. Remember it. 4242 is the pass key." in t.context
    assert t.prompt == " What is the pass key? The pass key is"
    assert answered(" 4242.") == "4242" and answered("abc") is None
