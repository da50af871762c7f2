"""`expertmesh eval --source/--offsets`: held-out text haystacks, the question where asked within
a chunk, the stop rate (scored here on a stand-in mesh; no Ray)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from expertmesh.cli import commands as cli
from expertmesh.model.tokenizer import ByteTokenizer
from expertmesh.pipelines import tasks
from expertmesh.pipelines import text_sources as ts
from expertmesh.pipelines.evaluate import STOP_SLACK, answered, context_length, evaluate, make_task
from tests.train.test_text_data import corpus

CHUNK = 2048


@pytest.fixture(scope="module")
def haystack():
    text = ts.Text("corpus", "local", "local corpus", corpus(random.Random(2), 200_000).encode())
    return ts.Haystack([text], mix_share=0.0)


def test_eval_cli_parses_source_and_offsets(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "cmd_eval", lambda args: seen.update(vars(args)) or 0)
    assert cli.main(["eval", "passkey", "--source", "kjv", "--offsets", "0,2010,-1", "--lengths", "4096",
                     "--modes", "exact", "--samples", "3", "--text-cache", "/tmp/x"]) == 0
    assert seen["source"] == "kjv" and seen["offsets"] == "0,2010,-1" and seen["text_cache"] == "/tmp/x"
    assert cli.main(["eval", "multikey"]) == 0
    assert seen["source"] == "synthetic" and seen["offsets"] is None


def test_context_length_puts_the_question_at_the_offset():
    for length in (4096, 5000, 32768):
        for offset in (0, 1, 1024, 2010, 2047, -38, -1):
            c = context_length(length, 44, offset, CHUNK, least=300)
            assert c % CHUNK == offset % CHUNK and c >= 300
            assert abs(c + 44 - length) <= CHUNK // 2 + 44
    assert context_length(4096, 44, None, CHUNK) == 4052


@pytest.mark.parametrize("task", ["passkey", "multikey"])
@pytest.mark.parametrize("source", ["text", "synthetic"])
def test_offsets_place_the_question_where_asked(task, source, haystack):
    hay = haystack if source == "text" else None
    for offset in (0, 1024, 2010, 2007, 2047, -1):
        for i in range(3):
            t = make_task(task, 4096, i, 3, random.Random(i), 4, hay, offset, CHUNK)
            ctx = len(t.context.encode())
            assert ctx % CHUNK == offset % CHUNK
            assert answered(t.answer) in t.context
            if task == "passkey":
                assert t.context.startswith(tasks.PASSKEY_INTRO) and t.prompt == tasks.PASSKEY_QUESTION
            else:
                assert t.context.count("The special magic number for") == 4


def test_real_text_needle_depth_follows_the_sample_index(haystack):
    where = []
    for i in range(5):
        t = make_task("passkey", 8000, i, 5, random.Random(0), haystack=haystack)
        assert len((t.context + t.prompt + t.answer).encode()) == 8000
        where.append(t.context.index("The pass key is") / len(t.context))
    assert where == sorted(where) and where[0] < 0.05 and where[-1] > 0.95


class StandIn:
    """A mesh that answers right (then eos, or junk) from the registered context."""

    def __init__(self, stop: bool, correct: bool = True) -> None:
        self.tokenizer = ByteTokenizer()
        self.config = SimpleNamespace(num_layers=4, num_kv_heads=2, head_dim=32, chunk_size=(CHUNK, CHUNK, None))
        self.stop, self.correct, self.contexts, self.asked = stop, correct, {}, []

    def register_context(self, ids, mode="exact"):
        self.contexts["c"] = self.tokenizer.decode(ids)
        return SimpleNamespace(id="c")

    def drop_context(self, cid):
        del self.contexts[cid]

    def generate(self, prompt, context_id=None, max_new_tokens=0):
        text = self.contexts[context_id]
        right = text.split("The pass key is ")[1].split(".")[0]
        self.asked.append((len(self.tokenizer.encode(text)), max_new_tokens - len(f" {right}.")))
        key = right if self.correct else "7"
        out = self.tokenizer.encode(f" {key}.") + ([2] if self.stop else self.tokenizer.encode("ab"))
        out = out[:max_new_tokens]
        return SimpleNamespace(token_ids=out, text=self.tokenizer.decode(out),
                               finish_reason="stop" if self.stop else "length")


@pytest.mark.parametrize("stop", [True, False])
def test_evaluate_scores_answers_and_stops_per_offset(stop, haystack):
    mesh = StandIn(stop)
    cells = evaluate(mesh, "passkey", [4096], ["exact"], 4, haystack=haystack, offsets=[0, -38], log=lambda s: None)
    assert [c.offset for c in cells] == [0, 2010]
    assert [c.answer_offset for c in cells] == [38, 0]  # the passkey question is 38 tokens
    for c in cells:
        row = c.row()
        assert row["accuracy"] == 1.0 and row["source"] == "local corpus"
        assert row["stop_rate"] == (1.0 if stop else 0.0) and row["stops_when_correct"] == (4 if stop else 0)
    assert all(ctx % CHUNK in (0, 2010) for ctx, _ in mesh.asked)
    assert {extra for _, extra in mesh.asked} == {STOP_SLACK}  # the answer's tokens + 2 at most


def test_evaluate_counts_wrong_answers_as_failures(haystack):
    cells = evaluate(StandIn(True, correct=False), "passkey", [3000], ["exact"], 3, haystack=haystack, log=lambda s: None)
    assert cells[0].correct == 0 and len(cells[0].failures) == 3 and cells[0].offset is None


def test_demo_relies_on_the_stop_only_for_a_model_marked_so(tmp_path):
    from expertmesh.pipelines.demo import stops_after_answer

    (tmp_path / "training.json").write_text('{"step": 3}')  # as the first demo model's: no mark
    assert stops_after_answer(str(tmp_path)) is False
    (tmp_path / "training.json").write_text('{"step": 3, "eos_after_answer": true}')
    assert stops_after_answer(str(tmp_path)) is True
    assert stops_after_answer(str(tmp_path / "missing")) is False


def test_random_offsets_spread_the_question_over_the_chunk(haystack):
    mesh = StandIn(stop=True)
    (cell,) = evaluate(mesh, "passkey", [32768], ["exact"], 12, haystack=haystack, random_offsets=True,
                       log=lambda s: None)
    offsets = {ctx % CHUNK for ctx, _ in mesh.asked}
    assert len(offsets) == 12 and cell.row()["offset"] == "random" and cell.accuracy == 1.0
    assert all(abs(ctx - 32768) <= CHUNK for ctx, _ in mesh.asked)


def test_needles_never_split_a_character():
    text = ("═" * 600).encode()  # 1,800 bytes of 3-byte characters, no space or line end
    for depth in (0.0, 0.1, 0.37, 0.5, 0.99, 1.0):
        tasks.insert_needles(text, [(depth, b" N.")]).decode("utf-8")
